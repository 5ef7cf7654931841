# Every check of the config, each stopping the run in one line `invalid config at <key>: ...`:
# validate_config (the schema, before anything reads the config) and check_config (the
# checks across keys, once config_values.smk has named the run's experiments). The
# Snakefile calls both.
import copy
import math
import os

import jsonschema
import yaml
from snakemake.utils import validate

# The schema ships with the library (captionflow.config reads its defaults for the stages).
SCHEMA = os.path.join(workflow.basedir, "captionflow", "config.schema.yaml")

# The stage sequences an experiment may run (experiments.<name>.stages).
STAGE_GRAPHS = (
    ["xe"],
    ["xe", "scst"],
    ["xe", "e2e"],
    ["xe", "e2e", "scst"],
    ["xe", "e2e", "scst", "scst_e2e"],
    ["xe", "es"],
    ["es"],
)


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
    given = copy.deepcopy(
        config
    )  # validate fills defaults in place, even when it fails
    try:
        validate(config, SCHEMA)
    except WorkflowError:
        with open(SCHEMA) as f:
            schema = yaml.safe_load(f)
        error = jsonschema.exceptions.best_match(
            jsonschema.Draft202012Validator(schema).iter_errors(given)
        )
        path = [str(p) for p in error.absolute_path]
        message = error.message
        if "then" in error.schema_path:
            # an experiment without `model:` (its if/then): the schema's words for it
            message = error.schema["description"]
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


def check_model_args():
    """Each experiment's model_args, and its retrieval model's, against the model's
    constructor: a typo, or a size that is not positive (Registry.bad_values), stops the
    run at DAG build in one line, before hours of resizing and extraction."""
    from captionflow.errors import CaptionflowError
    from captionflow.models import CAPTIONERS
    from captionflow.models.retrieval import RETRIEVAL

    for name, experiment in EXPERIMENTS.items():
        checks = []
        if name in CAPTIONING:
            checks.append(
                (
                    "model_args",
                    CAPTIONERS,
                    experiment["model"],
                    experiment["model_args"],
                )
            )
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


def check_config():
    """The checks across keys, in this order; the first failure stops the run. Remote jobs
    skip check_model_args (it imports the models; their main process checked)."""
    if FEATURE_SOURCE == "bottomup_tsv" and not config["features"]["tsv"]:
        raise WorkflowError(
            "invalid config at features.tsv: backbone bottomup_tsv needs the TSV file(s) to import"
        )
    for name in CAPTIONING:
        if stages(name) not in STAGE_GRAPHS:
            raise WorkflowError(
                f"invalid config at experiments.{name}.stages: {stages(name)} is not one of "
                + ", ".join(str(s) for s in STAGE_GRAPHS)
            )
    if workflow.is_main_process:
        check_model_args()
    if E2E_EXPERIMENTS and FEATURE_SOURCE in REGION_SOURCES:
        raise WorkflowError(
            f"invalid config at experiments.{E2E_EXPERIMENTS[0]}.stages: e2e fine-tunes a grid "
            f"backbone, and features.backbone is {FEATURE_SOURCE} (region features)"
        )
    for name, ensemble in ENSEMBLES.items():
        if name in EXPERIMENTS:
            raise WorkflowError(
                f"invalid config at ensembles.{name}: an experiment has that name; "
                "give the ensemble its own"
            )
        for member in ensemble["members"]:
            if member not in EXPERIMENTS:
                raise WorkflowError(
                    f"invalid config at ensembles.{name}.members: {member!r} is not an "
                    f"experiment of this config ({', '.join(EXPERIMENTS) or 'none'})"
                )
            if retrieval_only(member):
                raise WorkflowError(
                    f"invalid config at ensembles.{name}.members: {member!r} is a "
                    "retrieval-only experiment (no `model:`), it has no captioner to "
                    "decode with; name experiments that train one "
                    f"({', '.join(CAPTIONING) or 'none'})"
                )
    for name in RETRIEVAL_EXPERIMENTS:
        if retrieval_end_to_end(name) and FEATURE_SOURCE in REGION_SOURCES:
            raise WorkflowError(
                f"invalid config at experiments.{name}.retrieval.finetune_backbone_after: "
                f"fine-tuning needs a grid backbone, and features.backbone is {FEATURE_SOURCE} "
                "(region features); set it to -1"
            )
    for name in CAPTIONING:
        source = reranker(name)
        if source is not None and source not in RETRIEVAL_EXPERIMENTS:
            raise WorkflowError(
                f"invalid config at experiments.{name}.evaluate.rerank_k: reranking needs a "
                f"retrieval model, and experiment {source!r} has no `retrieval:` section"
            )
    for name, ensemble in ENSEMBLES.items():
        if ensemble["evaluate"]["rerank_k"]:
            raise WorkflowError(
                f"invalid config at ensembles.{name}.evaluate.rerank_k: ensembles do not rerank"
            )
    if REPORT["attention_images"] > REPORT["gallery_images"]:
        raise WorkflowError(
            f"invalid config at report.attention_images: {REPORT['attention_images']} is more "
            f"than report.gallery_images ({REPORT['gallery_images']}); the maps are drawn for "
            "gallery images"
        )
