# Experiments: their stage graphs, the input functions of the per-experiment stages, the
# stage targets, scheduler requests, the Java preflight and the end-of-run summary.
# (The second half of common.smk, which holds config validation and the data stages' values.)


EXPERIMENTS = config["experiments"]
METRICS_FILES = [f"results/{name}/test/metrics.json" for name in EXPERIMENTS]


wildcard_constraints:
    experiment="|".join(EXPERIMENTS) or "no_experiments",
    stage="xe|e2e|scst|es|scst_e2e",


STAGE_GRAPHS = (
    ["xe"],
    ["xe", "scst"],
    ["xe", "e2e"],
    ["xe", "e2e", "scst"],
    ["xe", "e2e", "scst", "scst_e2e"],
    ["xe", "es"],
    ["es"],
)


def stages(experiment):
    return EXPERIMENTS[experiment]["stages"]


for _name in EXPERIMENTS:
    if stages(_name) not in STAGE_GRAPHS:
        raise WorkflowError(
            f"invalid config at experiments.{_name}.stages: {stages(_name)} is not one of "
            + ", ".join(str(s) for s in STAGE_GRAPHS)
        )


def check_model_args():
    """Each experiment's model_args, and its retrieval model's, against the model's
    constructor: a typo, or a size that is not positive (Registry.bad_values), stops the
    run at DAG build in one line, before hours of resizing and extraction (remote jobs
    skip it: their main process checked)."""
    from captionflow.errors import CaptionflowError
    from captionflow.models import CAPTIONERS
    from captionflow.models.retrieval import RETRIEVAL

    for name, experiment in EXPERIMENTS.items():
        checks = [
            ("model_args", CAPTIONERS, experiment["model"], experiment["model_args"])
        ]
        if "retrieval" in experiment:
            section = experiment["retrieval"]
            checks.append(
                (
                    "retrieval.model_args",
                    RETRIEVAL,
                    section["model"],
                    section["model_args"],
                )
            )
        for key, registry, model, args in checks:
            try:
                registry.check_options(model, args)
            except CaptionflowError as error:
                raise WorkflowError(
                    f"invalid config at experiments.{name}.{key}: {error}"
                ) from None
            for option, why in registry.bad_values(model, args):
                raise WorkflowError(
                    f"invalid config at experiments.{name}.{key}.{option}: {why}"
                )


if workflow.is_main_process:
    check_model_args()


# Experiments that fine-tune their backbone, and the features regenerated with it.
E2E_EXPERIMENTS = [name for name in EXPERIMENTS if "e2e" in stages(name)]
if E2E_EXPERIMENTS and FEATURE_SOURCE in REGION_SOURCES:
    raise WorkflowError(
        f"invalid config at experiments.{E2E_EXPERIMENTS[0]}.stages: e2e fine-tunes a grid "
        f"backbone, and features.backbone is {FEATURE_SOURCE} (region features)"
    )
E2E_FEATURES = {
    name: {split: f"results/{name}/features_e2e/{split}.h5" for split in SPLITS}
    for name in E2E_EXPERIMENTS
}
# scst_e2e fine-tunes the backbone once more: its test features (for evaluate and export)
SCST_E2E_FEATURES = {
    name: {"test": f"results/{name}/features_scst_e2e/test.h5"}
    for name in EXPERIMENTS
    if "scst_e2e" in stages(name)
}


# Ensembles (config `ensembles`): experiments of this config decoding together.
ENSEMBLES = config["ensembles"]
for _name, _ensemble in ENSEMBLES.items():
    if _name in EXPERIMENTS:
        raise WorkflowError(
            f"invalid config at ensembles.{_name}: an experiment has that name; "
            "give the ensemble its own"
        )
    for _member in _ensemble["members"]:
        if _member not in EXPERIMENTS:
            raise WorkflowError(
                f"invalid config at ensembles.{_name}.members: {_member!r} is not an "
                f"experiment of this config ({', '.join(EXPERIMENTS) or 'none'})"
            )
ENSEMBLE_METRICS = [f"results/{name}/test/metrics.json" for name in ENSEMBLES]
EXPORT_FILES = [
    f"results/{name}/export/bundle.pt" for name in [*EXPERIMENTS, *ENSEMBLES]
]
ONNX_DIRS = [f"results/{name}/export/onnx" for name in EXPERIMENTS]
# The run's settings after schema defaults, for the bundles' provenance.
CONFIG_SHA256 = hashlib.sha256(
    json.dumps(config, sort_keys=True, default=str).encode()
).hexdigest()


wildcard_constraints:
    ensemble="|".join(ENSEMBLES) or "no_ensembles",
    name="|".join([*EXPERIMENTS, *ENSEMBLES]) or "no_experiments",


def last_stage(experiment):
    return stages(experiment)[-1]


def export_inputs(wildcards):
    """Input function of export_model_job: an experiment's last checkpoint, what its
    features were made of, and its test metrics (and SCST reward) for the provenance."""
    name, last = wildcards.experiment, last_stage(wildcards.experiment)
    inputs = {
        "checkpoint": f"results/{name}/{last}/model.pt",
        "labels_json": rules.prepro_labels.output.labels_json,
        "manifest": rules.resize_images.output.manifest,
        "features": features_of(name, last, "test"),
        "metrics": f"results/{name}/test/metrics.json",
    }
    if "scst" in stages(name):  # the reward of the last self-critical stage
        tuned = "scst_e2e" if "scst_e2e" in stages(name) else "scst"
        inputs["signature"] = f"results/{name}/{tuned}/reward.txt"
    return inputs


def ensemble_inputs(wildcards):
    """Input function of evaluate_ensemble_job: each member's last checkpoint and the test
    features it reads, in member order."""
    members = ENSEMBLES[wildcards.ensemble]["members"]
    return {
        "checkpoints": [f"results/{m}/{last_stage(m)}/model.pt" for m in members],
        "features": [features_of(m, last_stage(m), "test") for m in members],
    }


def ensemble_metrics(wildcards):
    """Input function: the members' last-stage test metrics, then the ensemble's."""
    members = ENSEMBLES[wildcards.ensemble]["members"]
    reports = {
        f"{m}_{last_stage(m)}": f"results/{m}/test/{last_stage(m)}/metrics.json"
        for m in members
    }
    reports["ensemble"] = f"results/{wildcards.ensemble}/test/ensemble/metrics.json"
    return reports


def ensemble_bundles(wildcards):
    return [
        f"results/{m}/export/bundle.pt"
        for m in ENSEMBLES[wildcards.ensemble]["members"]
    ]


def decoding_settings(wildcards):
    """Param: the `evaluate` section of the wildcard's experiment or ensemble, as decoding
    settings (no device, precision or scheduling keys)."""
    names = wildcards.keys()
    section = (
        EXPERIMENTS[wildcards.experiment]
        if "experiment" in names
        else ENSEMBLES[wildcards.ensemble]
    )
    return {
        k: v
        for k, v in section["evaluate"].items()
        if k not in (*SCHEDULING_KEYS, "device", "precision")
    }


RETRIEVAL_EXPERIMENTS = [
    name for name in EXPERIMENTS if "retrieval" in EXPERIMENTS[name]
]


def retrieval_end_to_end(name):
    """Whether experiment `name`'s retrieval model fine-tunes its backbone from the images."""
    return EXPERIMENTS[name]["retrieval"]["finetune_backbone_after"] >= 0


for _name in RETRIEVAL_EXPERIMENTS:
    if retrieval_end_to_end(_name) and FEATURE_SOURCE in REGION_SOURCES:
        raise WorkflowError(
            f"invalid config at experiments.{_name}.retrieval.finetune_backbone_after: "
            f"fine-tuning needs a grid backbone, and features.backbone is {FEATURE_SOURCE} "
            "(region features); set it to -1"
        )


def retrieval_images(wildcards):
    """Input function of train_retrieval_job and evaluate_retrieval_job: the resized
    images' manifest, for a retrieval model fine-tuned end to end."""
    if not retrieval_end_to_end(wildcards.experiment):
        return {}
    return {"manifest": rules.resize_images.output.manifest}


def reranker(name):
    """The experiment whose retrieval model reranks `name`'s beams, or None."""
    settings = EXPERIMENTS[name]["evaluate"]
    if not settings["rerank_k"]:
        return None
    source = settings["rerank_model"] or name
    if source not in RETRIEVAL_EXPERIMENTS:
        raise WorkflowError(
            f"invalid config at experiments.{name}.evaluate.rerank_k: reranking needs a "
            f"retrieval model, and experiment {source!r} has no `retrieval:` section"
        )
    return source


for _name in EXPERIMENTS:
    reranker(_name)
for _name, _ensemble in ENSEMBLES.items():
    if _ensemble["evaluate"]["rerank_k"]:
        raise WorkflowError(
            f"invalid config at ensembles.{_name}.evaluate.rerank_k: ensembles do not rerank"
        )


def rerank_inputs(wildcards):
    """Input function of evaluate_job: the retrieval model and its features, if it reranks."""
    source = reranker(wildcards.experiment)
    if source is None:
        return {}
    inputs = {
        "retrieval": f"results/{source}/retrieval/model.pt",
        "retrieval_features": FEATURE_FILES["test"],
    }
    if retrieval_end_to_end(source):
        inputs["retrieval_manifest"] = rules.resize_images.output.manifest
    return inputs


def experiments_with(stage):
    return [name for name in EXPERIMENTS if stage in stages(name)]


# What each stage target (rules/targets.smk) builds: the outputs of its per-experiment jobs.
STAGE_OUTPUTS = {
    "train_xe": [f"results/{e}/xe/model.pt" for e in experiments_with("xe")],
    "finetune_e2e": [f"results/{e}/e2e/model.pt" for e in experiments_with("e2e")],
    "regenerate_features": [
        f
        for features in (E2E_FEATURES, SCST_E2E_FEATURES)
        for e in features
        for f in features[e].values()
    ],
    "train_scst": [f"results/{e}/scst/model.pt" for e in experiments_with("scst")],
    "train_scst_e2e": [
        f"results/{e}/scst_e2e/model.pt" for e in experiments_with("scst_e2e")
    ],
    "train_es": [f"results/{e}/es/model.pt" for e in experiments_with("es")],
    "train_retrieval": [
        f"results/{e}/retrieval/model.pt" for e in RETRIEVAL_EXPERIMENTS
    ],
    "evaluate_retrieval": [
        f"results/{e}/test/retrieval/metrics.json" for e in RETRIEVAL_EXPERIMENTS
    ],
    "evaluate": [
        f"results/{e}/test/{s}/metrics.json" for e in EXPERIMENTS for s in stages(e)
    ]
    + [f"results/{e}/test/ensemble/metrics.json" for e in ENSEMBLES],
    "report_metrics": METRICS_FILES + ENSEMBLE_METRICS,
    "export_model": EXPORT_FILES,
    "export_onnx": ONNX_DIRS,
}
# The per-experiment (and per-ensemble) job rules of each stage target; `<stage>_job`
# where the stage has one kind of job.
STAGE_JOBS = {
    "regenerate_features": [
        "regenerate_features_job",
        "regenerate_scst_e2e_features_job",
    ],
    "evaluate": ["evaluate_job", "evaluate_ensemble_job"],
    "report_metrics": ["report_metrics_job", "report_ensemble_job"],
    "export_model": ["export_model_job", "export_ensemble_job"],
}


def stage_outputs(stage):
    """Input function of a stage target: its jobs' outputs for every experiment that has
    the stage. Forcing the target (`-R train_scst`) also forces its per-experiment jobs
    (train_scst_job): the target has no outputs, and Snakemake forces nothing upstream
    of a forced rule, so without this `-R <stage>` would retrain nothing."""

    def outputs(wildcards):
        if not STAGE_OUTPUTS[stage]:
            raise WorkflowError(
                f"nothing to build for {stage}: no experiment in the config has that "
                "stage (experiments.<name>.stages)"
            )
        if stage in workflow.dag_settings.forcerun:
            # evaluated while the DAG is built, before Snakemake decides what must run
            for job in STAGE_JOBS.get(stage, [f"{stage}_job"]):
                workflow.dag.forcerules.add(workflow.get_rule(job))
        return STAGE_OUTPUTS[stage]

    return outputs


def features_of(name, stage, split):
    """The features experiment `name`'s `stage` reads. Stages after e2e (and e2e's own test
    evaluation) read the regenerated ones, scst_e2e's test evaluation those of its own
    backbone; everything else the original extraction."""
    order = stages(name)
    if stage == "scst_e2e":
        return SCST_E2E_FEATURES[name][split]
    if "e2e" in order and order.index(stage) >= order.index("e2e"):
        return E2E_FEATURES[name][split]
    return FEATURE_FILES[split]


def stage_features(split, stage=None):
    """Input function: the features a stage (or the wildcard's stage) reads."""
    return lambda wildcards: features_of(
        wildcards.experiment, stage or wildcards.stage, split
    )


def previous_checkpoint(wildcards):
    """Input function: the checkpoint of the stage before SCST (xe, or e2e when it ran)."""
    order = stages(wildcards.experiment)
    return f"results/{wildcards.experiment}/{order[order.index('scst') - 1]}/model.pt"


def es_init(wildcards):
    """Input function of train_es_job: the XE checkpoint it starts from, if XE ran."""
    if "xe" in stages(wildcards.experiment):
        return {"init": f"results/{wildcards.experiment}/xe/model.pt"}
    return {}


def stage_metrics(wildcards):
    """Input function: the per-stage test metrics of an experiment, in stage order."""
    return {
        s: f"results/{wildcards.experiment}/test/{s}/metrics.json"
        for s in stages(wildcards.experiment)
    }


def experiment_setting(key):
    """Input function/param: one key of the wildcard's experiment config."""
    return lambda wildcards: EXPERIMENTS[wildcards.experiment][key]


# Keys of a stage section that are for the scheduler, not for the stage's code.
SCHEDULING_KEYS = ("gpus", "runtime")


def stage_section(name, stage):
    """Experiment `name`'s settings of `stage`: its section; for scst_e2e the experiment's
    `scst` section with its `scst_e2e` section on top (one process: no `gpus`)."""
    if stage == "scst_e2e":
        scst = {k: v for k, v in EXPERIMENTS[name]["scst"].items() if k != "gpus"}
        return {**scst, **EXPERIMENTS[name]["scst_e2e"]}
    return EXPERIMENTS[name][stage]


def stage_settings(stage):
    """Param: an experiment's `stage` section (xe, e2e, scst, evaluate) minus scheduling keys."""
    return lambda wildcards: {
        k: v
        for k, v in stage_section(wildcards.experiment, stage).items()
        if k not in SCHEDULING_KEYS
    }


def stage_processes(stage):
    """Param: training processes of a stage (`gpus`); more than one runs under torchrun."""
    return lambda wildcards: EXPERIMENTS[wildcards.experiment][stage]["gpus"]


def job_memory(wildcards, input, attempt):
    """mem_mb of an experiment's training or evaluation job: the experiment's mem_mb plus
    the HDF5 inputs it holds in memory (captionflow.data.store.held_mb: feature files up to
    4 GiB; larger ones stream in bounded batches and add nothing), sized when the job is
    about to run; a retry asks for attempt x that."""
    from captionflow.data.store import held_mb

    return (EXPERIMENTS[wildcards.experiment]["mem_mb"] + held_mb(input)) * attempt


def stage_resources(stage):
    """Scheduler requests of an experiment's `stage` job: GPUs (none with device cpu), CPUs
    per GPU (the experiment's threads; a job without GPUs asks for its threads per task),
    one node, memory (`job_memory`) and minutes, which grow with each retry. The SLURM
    profile's partition file sends a job to a GPU partition iff it asks for GPUs.
    """

    def section(wildcards):
        return stage_section(wildcards.experiment, stage)

    return dict(
        # e2e and evaluate run one process: their sections have no `gpus` key
        gpu=lambda wildcards: gpus_for(
            section(wildcards)["device"], section(wildcards).get("gpus", 1)
        ),
        cpus_per_gpu=lambda wildcards: EXPERIMENTS[wildcards.experiment]["threads"],
        nodes=1,  # torchrun --standalone: every GPU of the job on one node
        mem_mb=job_memory,
        runtime=lambda wildcards, attempt: section(wildcards)["runtime"] * attempt,
    )


def java_preflight():
    """Stop at workflow start, in one line, when evaluate will need Java and there is none."""
    if EXPERIMENTS:
        from captionflow.metrics.coco import java_available

        reason = java_available()
        if reason:
            raise WorkflowError(f"preflight: {reason}")


STAGE_RULE = {
    "xe": "train_xe",
    "e2e": "finetune_e2e",
    "scst": "train_scst",
    "scst_e2e": "train_scst_e2e",
    "es": "train_es",
}


def print_summary():
    """At the end of a successful run: each experiment's test metrics and its files."""
    from captionflow.metrics.summary import format_bundles, format_summary

    experiments = {
        name: {
            s: {
                "metrics": f"results/{name}/test/{s}/metrics.json",
                "checkpoint": f"results/{name}/{s}/model.pt",
                "predictions": f"results/{name}/test/{s}/predictions.json",
                "log": f"logs/{STAGE_RULE[s]}/{name}.log",
            }
            for s in stages(name)
        }
        for name in EXPERIMENTS
    }
    for name, ensemble in ENSEMBLES.items():
        experiments[name] = {
            f"{m} {last_stage(m)}": experiments[m][last_stage(m)]
            for m in ensemble["members"]
        }
        experiments[name]["ensemble"] = {
            "metrics": f"results/{name}/test/ensemble/metrics.json",
            "checkpoint": f"results/{name}/export/bundle.pt",
            "predictions": f"results/{name}/test/ensemble/predictions.json",
            "log": f"logs/evaluate/{name}_ensemble.log",
        }
    for line in format_summary(experiments):
        print(line, file=sys.stderr)
    for name in RETRIEVAL_EXPERIMENTS:
        path = f"results/{name}/test/retrieval/metrics.json"
        if os.path.exists(path):
            with open(path) as f:
                r = json.load(f)
            t2i, i2t = r["text_to_image"], r["image_to_text"]
            print(
                f"\n{name} retrieval ({r['model']}, test): text-to-image R@1 {t2i['R@1']:.1f} "
                f"R@5 {t2i['R@5']:.1f} R@10 {t2i['R@10']:.1f} mAP {t2i['mAP']:.1f}; "
                f"image-to-text R@1 {i2t['R@1']:.1f} ({path})",
                file=sys.stderr,
            )
    # each bundle and the checkpoints it was made from (export_inputs, ensemble_bundles)
    bundles = {
        **{
            f"results/{name}/export/bundle.pt": [
                f"results/{name}/{last_stage(name)}/model.pt"
            ]
            for name in EXPERIMENTS
        },
        **{
            f"results/{name}/export/bundle.pt": [
                f"results/{m}/{last_stage(m)}/model.pt" for m in ensemble["members"]
            ]
            for name, ensemble in ENSEMBLES.items()
        },
    }
    for line in format_bundles(bundles):
        print(line, file=sys.stderr)
