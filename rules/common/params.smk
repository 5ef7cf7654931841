# Params: the settings a job's code receives, cut from the config (scheduler keys left
# out: resources.smk turns those into requests).
import hashlib
import json

# Keys of a stage section that are for the scheduler, not for the stage's code.
SCHEDULING_KEYS = ("gpus", "runtime")

# The run's settings after schema defaults, for the bundles' provenance.
CONFIG_SHA256 = hashlib.sha256(
    json.dumps(config, sort_keys=True, default=str).encode()
).hexdigest()


def resize_sources(wildcards):
    """Of resize_images: a hash over (relpath, size, mtime_ns) of every listed image, so an
    image changed in place (images are not declared inputs) reruns resize_images. The
    demo's images are a declared output already: fingerprinting them would rerun every
    time. The listing is cached in .snakemake/captionflow/ (keyed on the caption file's
    path, size and mtime): a DAG build at COCO's size stats the images without parsing
    the 150 MB caption file again."""
    if DEMO:
        return "demo images (declared input)"
    from captionflow.data.resize import sources_digest

    # CUHK-PEDES: the images its annotation file lists (the imported file does not exist yet)
    listing = config["data"]["cuhk_pedes_json"] if CUHK_PEDES else CAPTIONS
    return sources_digest(listing, IMAGES_ROOT, cache_dir=".snakemake/captionflow")


def extraction_settings(kind):
    """The keys of the `features` section (and the global seed) that extraction `kind`
    takes: "features" (extract_features) or "regions" (extract_regions), as
    captionflow.config.SECTIONS lists them."""
    from captionflow.config import section_defaults

    keys = section_defaults(kind)
    settings = {**config["features"], "seed": config["seed"]}
    return {k: v for k, v in settings.items() if k in keys}


def experiment_setting(key):
    """One key of the wildcard's experiment config."""
    return lambda wildcards: EXPERIMENTS[wildcards.experiment][key]


def stage_section(name, stage):
    """Experiment `name`'s settings of `stage`: its section; for scst_e2e the experiment's
    `scst` section with its `scst_e2e` section on top (one process: no `gpus`)."""
    if stage == "scst_e2e":
        scst = {k: v for k, v in EXPERIMENTS[name]["scst"].items() if k != "gpus"}
        return {**scst, **EXPERIMENTS[name]["scst_e2e"]}
    return EXPERIMENTS[name][stage]


def stage_settings(stage):
    """An experiment's `stage` section (xe, e2e, scst, evaluate) minus scheduling keys."""
    return lambda wildcards: {
        k: v
        for k, v in stage_section(wildcards.experiment, stage).items()
        if k not in SCHEDULING_KEYS
    }


def stage_processes(stage):
    """Training processes of a stage (`gpus`); more than one runs under torchrun."""
    return lambda wildcards: EXPERIMENTS[wildcards.experiment][stage]["gpus"]


def decoding_settings(wildcards):
    """The `evaluate` section of the wildcard's experiment or ensemble, as decoding
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
