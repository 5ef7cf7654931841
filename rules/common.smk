# Config validation and the shared values of the data stages: which files they read and write
# (per-experiment values and input functions: common_experiments.smk).
import hashlib
import json
import math
import sys

import jsonschema
import yaml
from snakemake.utils import validate

# The schema ships with the library (captionflow.config reads its defaults for the stages).
SCHEMA = "../captionflow/config.schema.yaml"


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
            from captionflow.config import renamed_key_message

            allowed = sorted(error.schema.get("properties", {}))
            path.append(next(k for k in error.instance if k not in allowed))
            message = renamed_key_message(*path[-2:]) if len(path) > 1 else None
            if message:  # a key of an earlier version: name the new one
                raise WorkflowError(
                    f"invalid config at {'.'.join(path)}: {message}"
                ) from None
            message = f"unknown key (allowed here: {', '.join(allowed)})"
        elif error.validator == "pattern" and "description" in error.schema:
            # a name that becomes a folder: the allowed characters in words, not the regex
            message = (
                f"{error.instance!r} is not a safe name ({error.schema['description']}); "
                "it names a folder under results/"
            )
        elif error.validator == "not" and "enum" in error.validator_value:
            reserved = ", ".join(error.validator_value["enum"])
            message = (
                f"{error.instance!r} is reserved (the workflow's own folders under "
                f"results/: {reserved}); choose another name"
            )
        if "propertyNames" in error.schema_path:  # the key itself is wrong: name it
            path.append(str(error.instance))
        key = ".".join(path) or "(top level)"
        raise WorkflowError(f"invalid config at {key}: {message}") from None


validate_config(config)

DEMO = config["data"]["source"] == "demo"

# Splits written by prepro_labels; restval joins train unless configured otherwise.
SPLITS = ["train", "val", "test"] + (
    [] if config["labels"]["restval_to_train"] else ["restval"]
)

CUHK_PEDES = config["data"]["source"] == "cuhk_pedes"

# The Karpathy-schema caption file every data stage reads: generated for the demo and for
# CUHK-PEDES (rule import_cuhk_pedes), the user's own otherwise.
CAPTIONS = {
    "demo": "results/demo/dataset_coco.json",
    "karpathy": config["data"]["karpathy_json"],
    "cuhk_pedes": "results/data/cuhk_pedes/dataset_coco.json",
}[config["data"]["source"]]
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

    # CUHK-PEDES: the images its annotation file lists (the imported file does not exist yet)
    listing = config["data"]["cuhk_pedes_json"] if CUHK_PEDES else CAPTIONS
    return sources_digest(listing, IMAGES_ROOT)


# The source of FEATURE_FILES: extract_features (grid), import_bottomup or extract_regions.
REGION_SOURCES = ("bottomup_tsv", "fasterrcnn_resnet50_fpn")
FEATURE_SOURCE = config["features"]["backbone"]
if FEATURE_SOURCE == "bottomup_tsv" and not config["features"]["tsv"]:
    raise WorkflowError(
        "invalid config at features.tsv: backbone bottomup_tsv needs the TSV file(s) to import"
    )

# The network that makes the grid features (captionflow.features.backbones.Backbone), one
# value for every job that runs it (extraction, regeneration, e2e, scst_e2e, retrieval).
BACKBONE = {
    "name": config["features"]["backbone"],
    "weights": config["features"]["weights"],
    "seed": config["seed"],
    "image_size": config["resize"]["size"],
    "grid_size": config["features"]["grid_size"],
}

def extraction_settings(kind):
    """Param: the keys of the `features` section (and the global seed) that extraction
    `kind` takes: "features" (extract_features) or "regions" (extract_regions), as
    captionflow.config.SECTIONS lists them."""
    from captionflow.config import section_defaults

    keys = section_defaults(kind)
    settings = {**config["features"], "seed": config["seed"]}
    return {k: v for k, v in settings.items() if k in keys}


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
