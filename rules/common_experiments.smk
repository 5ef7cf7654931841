# Experiments: their stage graphs, the input functions of the per-experiment stages, the
# stage targets, scheduler requests, the Java preflight and the end-of-run summary.
# (The second half of common.smk, which holds config validation and the data stages' values.)


EXPERIMENTS = config["experiments"]
METRICS_FILES = [f"results/{name}/test/metrics.json" for name in EXPERIMENTS]


wildcard_constraints:
    experiment="|".join(EXPERIMENTS) or "no_experiments",
    stage="xe|e2e|scst",


STAGE_GRAPHS = (["xe"], ["xe", "scst"], ["xe", "e2e"], ["xe", "e2e", "scst"])


def stages(experiment):
    return EXPERIMENTS[experiment]["stages"]


for _name in EXPERIMENTS:
    if stages(_name) not in STAGE_GRAPHS:
        raise WorkflowError(
            f"invalid config at experiments.{_name}.stages: {stages(_name)} is not one of "
            + ", ".join(str(s) for s in STAGE_GRAPHS)
        )

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


def experiments_with(stage):
    return [name for name in EXPERIMENTS if stage in stages(name)]


# What each stage target (rules/targets.smk) builds: the outputs of its per-experiment jobs.
STAGE_OUTPUTS = {
    "train_xe": [f"results/{e}/xe/model.pt" for e in experiments_with("xe")],
    "finetune_e2e": [f"results/{e}/e2e/model.pt" for e in experiments_with("e2e")],
    "regenerate_features": [f for e in E2E_FEATURES for f in E2E_FEATURES[e].values()],
    "train_scst": [f"results/{e}/scst/model.pt" for e in experiments_with("scst")],
    "evaluate": [
        f"results/{e}/test/{s}/metrics.json" for e in EXPERIMENTS for s in stages(e)
    ],
    "report_metrics": METRICS_FILES,
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
            workflow.dag.forcerules.add(workflow.get_rule(f"{stage}_job"))
        return STAGE_OUTPUTS[stage]

    return outputs


def stage_features(split, stage=None):
    """Input function: the features a stage reads. Stages after e2e (and e2e's own test
    evaluation) read the regenerated ones; everything else the original extraction."""

    def features(wildcards):
        name, current = wildcards.experiment, stage or wildcards.stage
        order = stages(name)
        if "e2e" in order and order.index(current) >= order.index("e2e"):
            return E2E_FEATURES[name][split]
        return FEATURE_FILES[split]

    return features


def previous_checkpoint(wildcards):
    """Input function: the checkpoint of the stage before SCST (xe, or e2e when it ran)."""
    order = stages(wildcards.experiment)
    return f"results/{wildcards.experiment}/{order[order.index('scst') - 1]}/model.pt"


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


def stage_settings(stage):
    """Param: an experiment's `stage` section (xe, e2e, scst, evaluate) minus scheduling keys."""
    return lambda wildcards: {
        k: v
        for k, v in EXPERIMENTS[wildcards.experiment][stage].items()
        if k not in SCHEDULING_KEYS
    }


def stage_processes(stage):
    """Param: training processes of a stage (`gpus`); more than one runs under torchrun."""
    return lambda wildcards: EXPERIMENTS[wildcards.experiment][stage]["gpus"]


def stage_resources(stage):
    """Scheduler requests of an experiment's `stage` job: GPUs (none with device cpu), CPUs
    per GPU (the experiment's threads), memory and minutes, which grow with each retry.
    """

    def section(wildcards):
        return EXPERIMENTS[wildcards.experiment][stage]

    return dict(
        # e2e and evaluate run one process: their sections have no `gpus` key
        gpu=lambda wildcards: gpus_for(
            section(wildcards)["device"], section(wildcards).get("gpus", 1)
        ),
        cpus_per_gpu=lambda wildcards: EXPERIMENTS[wildcards.experiment]["threads"],
        mem_mb=lambda wildcards, attempt: EXPERIMENTS[wildcards.experiment]["mem_mb"]
        * attempt,
        runtime=lambda wildcards, attempt: section(wildcards)["runtime"] * attempt,
    )


def java_preflight():
    """Stop at workflow start, in one line, when evaluate will need Java and there is none."""
    if EXPERIMENTS:
        from captionflow.metrics.coco import java_available

        reason = java_available()
        if reason:
            raise WorkflowError(f"preflight: {reason}")


STAGE_RULE = {"xe": "train_xe", "e2e": "finetune_e2e", "scst": "train_scst"}


def print_summary():
    """At the end of a successful run: each experiment's test metrics and its files."""
    from captionflow.metrics.summary import format_summary

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
    for line in format_summary(experiments):
        print(line, file=sys.stderr)
