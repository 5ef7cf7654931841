# Config validation, shared values and input functions: which files each stage reads and writes.
import math
import sys

import jsonschema
import yaml
from snakemake.utils import validate

SCHEMA = "../schemas/config.schema.yaml"


def non_finite(value, path=()):
    """(key path, value) of every NaN or +-inf number anywhere in a config tree."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from non_finite(v, (*path, str(k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from non_finite(v, (*path, str(i)))
    elif isinstance(value, float) and not math.isfinite(value):
        yield path, value


def yaml_number(value):
    """NaN and inf spelled as YAML spells them (.nan, .inf, -.inf)."""
    return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")


def validate_config(config):
    """Validate and fill defaults; on error stop with one line naming the offending key.

    NaN and +-inf are refused first, anywhere: JSON schema bounds let NaN through (every
    comparison with NaN is false) and inf passes every lower bound.
    """
    for path, value in non_finite(config):
        raise WorkflowError(
            f"invalid config at {'.'.join(path) or '(top level)'}: {yaml_number(value)} is not a finite number"
        )
    try:
        validate(config, SCHEMA)
    except WorkflowError:
        with open(workflow.source_path(SCHEMA)) as f:
            schema = yaml.safe_load(f)
        error = jsonschema.exceptions.best_match(
            jsonschema.Draft202012Validator(schema).iter_errors(config)
        )
        path = [str(p) for p in error.absolute_path]
        message = error.message
        if error.validator == "additionalProperties":
            allowed = sorted(error.schema.get("properties", {}))
            path.append(next(k for k in error.instance if k not in allowed))
            message = f"unknown key (allowed here: {', '.join(allowed)})"
        key = ".".join(path) or "(top level)"
        raise WorkflowError(f"invalid config at {key}: {message}") from None


validate_config(config)

DEMO = config["data"]["source"] == "demo"

# Splits written by prepro_labels; restval joins train unless configured otherwise.
SPLITS = ["train", "val", "test"] + (
    [] if config["labels"]["restval_to_train"] else ["restval"]
)

CAPTIONS = "results/demo/dataset_coco.json" if DEMO else config["data"]["karpathy_json"]
IMAGES_ROOT = "results/demo" if DEMO else config["data"]["images_root"]

FEATURE_DIR = f"results/features/{config['features']['backbone']}"
FEATURE_FILES = {split: f"{FEATURE_DIR}/{split}.h5" for split in SPLITS}


def resize_inputs(wildcards):
    """The caption file, plus the generated image folder when the demo is the source."""
    inputs = {"captions": CAPTIONS}
    if DEMO:
        inputs["images"] = "results/demo/images"
    return inputs


def resize_sources(wildcards):
    """Param: a hash over (relpath, size, mtime_ns) of every listed image, so an image
    changed in place (images are not declared inputs) reruns resize_images. The demo's
    images are a declared output already: fingerprinting them would rerun every time."""
    if DEMO:
        return "demo images (declared input)"
    from captionflow.data.resize import sources_digest

    return sources_digest(CAPTIONS, IMAGES_ROOT)


# The source of FEATURE_FILES: extract_features (grid), import_bottomup or extract_regions.
REGION_SOURCES = ("bottomup_tsv", "fasterrcnn_resnet50_fpn")
FEATURE_SOURCE = config["features"]["backbone"]
if FEATURE_SOURCE == "bottomup_tsv" and not config["features"]["tsv"]:
    raise WorkflowError(
        "invalid config at features.tsv: backbone bottomup_tsv needs the TSV file(s) to import"
    )

# Keys of the `features` section for the scheduler or for the region sources only.
NOT_GRID_KEYS = ("threads", "mem_mb", "runtime", "tsv", "max_boxes")


def feature_settings():
    """Param: the `features` section as extract_features takes it, plus the global seed."""
    settings = {k: v for k, v in config["features"].items() if k not in NOT_GRID_KEYS}
    return {**settings, "seed": config["seed"]}


def region_settings():
    """Param: the `features` section as extract_regions takes it (num_boxes = max_boxes)."""
    keys = ("weights", "dtype", "batch_size", "num_workers", "chunk_batches", "device")
    settings = {k: config["features"][k] for k in keys}
    return {
        **settings,
        "num_boxes": config["features"]["max_boxes"],
        "seed": config["seed"],
    }


def gpus_for(device, count=1):
    """GPUs a job asks the scheduler for: none when it is pinned to the CPU."""
    return 0 if device == "cpu" else count


def feature_resources():
    """Scheduler requests of extract_features and regenerate_features (config `features`);
    memory and minutes grow with each retry."""
    section = config["features"]
    return dict(
        gpu=gpus_for(section["device"]),
        cpus_per_gpu=section["threads"],
        mem_mb=lambda wildcards, attempt: section["mem_mb"] * attempt,
        runtime=lambda wildcards, attempt: section["runtime"] * attempt,
    )


EXPERIMENTS = config["experiments"]
METRICS_FILES = [f"results/{name}/test/metrics.json" for name in EXPERIMENTS]


wildcard_constraints:
    experiment="|".join(EXPERIMENTS) or "no_experiments",
    stage="xe|e2e|scst",


STAGE_GRAPHS = (["xe"], ["xe", "scst"], ["xe", "e2e"], ["xe", "e2e", "scst"])


def stages(experiment):
    return EXPERIMENTS[experiment].get("stages", ["xe"])


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


def experiment_setting(key, default=None):
    """Input function/param: one key of the wildcard's experiment config."""
    return lambda wildcards: EXPERIMENTS[wildcards.experiment].get(key, default)


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
    return lambda wildcards: EXPERIMENTS[wildcards.experiment][stage].get("gpus", 1)


def stage_resources(stage):
    """Scheduler requests of an experiment's `stage` job: GPUs (none with device cpu), CPUs
    per GPU (the experiment's threads), memory and minutes, which grow with each retry.
    """

    def section(wildcards):
        return EXPERIMENTS[wildcards.experiment][stage]

    return dict(
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
