"""Stage settings from config sections, with the defaults of the config schema and nowhere else.

Every stage's settings are a frozen dataclass whose fields are the keys of its config
section (captionflow/config.schema.yaml, which the Snakefile validates the config with) and
have no defaults: `build(XEConfig, {"epochs": 1})` takes every key it is not given from the
schema, and refuses a key the section does not have in one line. The workflow's scripts, the
CLI, the tests and bench/ build settings this way, so a default is written once.

The schema lives inside the package (package data), not in a top-level schemas/ folder, so
that an installed captionflow finds it without the workflow's checkout; rules/common.smk
validates the config with this very file.
"""

import dataclasses
import functools
from pathlib import Path

import yaml

from captionflow.errors import CaptionflowError

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")

# Keys of a section that are for the scheduler (read by the rules: resources, torchrun), never
# for the stage's code.
SCHEDULING = ("gpus", "runtime", "threads", "mem_mb")

# Settings name -> (schema sections whose keys it takes, later over earlier; keys of those
# sections that are not its own besides SCHEDULING). A section is a dotted path in the schema:
# "features" is the top-level key, "$defs.xe" a definition; "seed" is the global seed itself.
BACKBONE_KEYS = ("backbone", "weights", "grid_size")
REGION_ONLY = (
    "tsv",
    "max_boxes",
    "detector_min_size",
    "detector_max_size",
    "detector_proposals",
    "detector_score_thresh",
)
SECTIONS = {
    "xe": (("$defs.xe",), ()),
    "e2e": (("$defs.e2e",), ()),
    "scst": (("$defs.scst",), ()),
    "scst_e2e": (("$defs.scst", "$defs.scst_e2e"), ()),  # the experiment's scst with scst_e2e on top
    "es": (("$defs.es",), ()),
    "retrieval": (("$defs.retrieval",), ()),
    "evaluate": (("$defs.evaluate",), ()),
    # grid features (extract_features); the network's keys are the Backbone's (features.backbones)
    "features": (("features",), (*REGION_ONLY, *BACKBONE_KEYS)),
    "regions": (("features", "seed"), ("backbone", "grid_size", "precision", "tsv")),  # extract_regions
}

# Keys that were renamed: (section, old key) -> new key. An old key is refused naming the new one.
RENAMED = {
    ("e2e", "amp"): "precision",
    ("labels", "max_length"): "max_len",
    ("features", "att_size"): "grid_size",
}


@functools.cache
def schema():
    """The config schema (a dict; cached: do not modify)."""
    with open(SCHEMA_PATH, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _properties(path):
    """{key: property schema} of a schema path: "$defs.<name>", a top-level section, or a
    top-level leaf ("seed", which then provides itself)."""
    if path.startswith("$defs."):
        return schema()["$defs"][path.removeprefix("$defs.")]["properties"]
    node = schema()["properties"][path]
    return node.get("properties", {path: node})


def section_defaults(name):
    """{key: schema default} of settings `name` (a key of SECTIONS), scheduling keys left out."""
    paths, not_own = SECTIONS[name]
    defaults = {}
    for path in paths:
        for key, prop in _properties(path).items():
            if key not in SCHEDULING and key not in not_own:
                defaults[key] = prop["default"]
    return defaults


def renamed_key_message(section, key):
    """The one-line hint for a renamed key (`section.key`), or None."""
    new = RENAMED.get((section, key))
    return f"{section}.{key} was renamed: write {section}.{new}" if new else None


def build(cls, values=None, /, **overrides):
    """Settings dataclass `cls` (its SECTION names its schema section) from a config section
    dict and/or keyword arguments; every key left out takes the schema's default."""
    name = cls.SECTION
    given = {**(values or {}), **overrides}
    own = [f.name for f in dataclasses.fields(cls)]
    for key in given:
        if key not in own:
            hint = renamed_key_message(name, key) or f"unknown key {name}.{key} (allowed: {', '.join(sorted(own))})"
            raise CaptionflowError(hint)
    return cls(**{**section_defaults(name), **given})
