"""Config flows one way: the schema's defaults are the dataclasses' defaults, key for key."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from captionflow.features.extract import FeatureConfig
from captionflow.training.e2e import E2EConfig
from captionflow.training.scst import SCSTConfig
from captionflow.training.xe import XEConfig

SCHEMA = yaml.safe_load((Path(__file__).parents[2] / "schemas/config.schema.yaml").read_text())


def _defaults(cls):
    return {f.name: f.default for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("section, cls", [("xe", XEConfig), ("scst", SCSTConfig), ("e2e", E2EConfig)])
def test_stage_sections_match_their_dataclass(section, cls):
    props = SCHEMA["$defs"][section]["properties"]
    scheduling = ("gpus", "runtime")  # read by the rules (resources, torchrun), not the stage
    assert {k: v["default"] for k, v in props.items() if k not in scheduling} == _defaults(cls)


def test_feature_section_matches_feature_config():
    props = SCHEMA["properties"]["features"]["properties"]
    not_grid = ("threads", "mem_mb", "runtime", "tsv", "max_boxes")  # scheduler / region sources
    schema = {k: v["default"] for k, v in props.items() if k not in not_grid}
    expected = {k: v for k, v in _defaults(FeatureConfig).items() if k != "seed"}  # seed is global
    assert schema == expected


def test_region_settings_match_region_config():
    """rules/common.smk's region_settings() passes these features keys to RegionConfig."""
    from captionflow.features.regions import RegionConfig

    props = SCHEMA["properties"]["features"]["properties"]
    fields = {f.name for f in dataclasses.fields(RegionConfig)}
    passed = {"weights", "dtype", "batch_size", "num_workers", "chunk_batches", "device"}
    assert passed <= set(props) and passed | {"num_boxes", "seed"} <= fields
