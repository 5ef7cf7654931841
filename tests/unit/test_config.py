"""Config flows one way: the schema's defaults are the dataclasses' defaults, key for key."""

import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from captionflow.features.extract import FeatureConfig
from captionflow.stages.evaluate import DecodingConfig
from captionflow.training.e2e import E2EConfig
from captionflow.training.es import ESConfig
from captionflow.training.scst import SCSTConfig
from captionflow.training.xe import XEConfig

SCHEMA = yaml.safe_load((Path(__file__).parents[2] / "schemas/config.schema.yaml").read_text())


def _defaults(cls):
    return {f.name: f.default for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("section, cls", [("xe", XEConfig), ("scst", SCSTConfig), ("e2e", E2EConfig), ("es", ESConfig), ("evaluate", DecodingConfig)])
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
    """rules/common/params.smk's region_settings() passes these features keys to RegionConfig."""
    from captionflow.features.regions import RegionConfig

    props = SCHEMA["properties"]["features"]["properties"]
    fields = {f.name for f in dataclasses.fields(RegionConfig)}
    passed = {"weights", "dtype", "batch_size", "num_workers", "chunk_batches", "device"}
    assert passed <= set(props) and passed | {"num_boxes", "seed"} <= fields


def _numeric_keys():
    sections = {s: SCHEMA["$defs"][s]["properties"] for s in ("xe", "e2e", "scst", "evaluate")}
    sections["features"] = SCHEMA["properties"]["features"]["properties"]
    for section, props in sections.items():
        for key, spec in props.items():
            if spec.get("type") in ("number", "integer") and key != "seed":
                yield f"{section}.{key}", spec


def test_every_number_of_the_stages_is_bounded_and_its_default_fits():
    """Rates, sizes and counts have a lower bound (NaN and inf are refused by
    validate_config in rules/common/config_checks.smk: no schema bound catches them); probabilities,
    smoothing and ratios lie in [0, 1]; every default satisfies its own bounds."""
    for key, spec in _numeric_keys():
        low = spec.get("minimum", spec.get("exclusiveMinimum"))
        assert low is not None, f"{key} has no lower bound"
        d = spec["default"]
        assert d >= spec.get("minimum", -math.inf) and d > spec.get("exclusiveMinimum", -math.inf), key
        assert d <= spec.get("maximum", math.inf) and d < spec.get("exclusiveMaximum", math.inf), key
        name = key.split(".")[1]
        if name.endswith("lr"):
            assert spec.get("exclusiveMinimum") == 0 or (name == "backbone_lr" and spec["minimum"] == 0), key
        if name in ("label_smoothing", "ss_max", "bleu_weight", "min_lr_ratio", "plateau_factor"):
            assert low == 0 and spec.get("maximum", spec.get("exclusiveMaximum")) == 1, key
        if name in ("epochs", "batch_size", "max_len", "samples", "patience", "accumulate", "beam_size", "chunk_batches"):
            assert spec.get("minimum", 0) >= 1, key
        if name in ("checkpoint_every", "checkpoint_minutes"):  # 0: that trigger is off
            assert spec["minimum"] == 0, key


def test_retrieval_section_matches_retrieval_config():
    from captionflow.training.retrieval import RetrievalConfig

    props = SCHEMA["$defs"]["retrieval"]["properties"]
    schema = {k: v["default"] for k, v in props.items() if k != "runtime"}
    expected = _defaults(RetrievalConfig)
    assert schema.pop("model_args") == {} and expected.pop("model_args") == ()  # a dict in YAML, pairs in the frozen dataclass
    assert schema == expected


def test_scst_e2e_section_is_scst_settings_plus_its_own():
    from captionflow.training.scst_e2e import SCSTE2EConfig
    from captionflow.training.self_critical import SCSTConfig

    props = SCHEMA["$defs"]["scst_e2e"]["properties"]
    fields = _defaults(SCSTE2EConfig)
    assert set(props) - {"runtime"} <= set(fields)  # every key reaches the stage's settings
    assert set(fields) - set(_defaults(SCSTConfig)) == {"backbone_lr", "freeze_stages"}
    assert {k: props[k]["default"] for k in ("backbone_lr", "freeze_stages")} == {k: fields[k] for k in ("backbone_lr", "freeze_stages")}


def _numbers(node, path="$"):
    """(path, spec) of every number or integer setting anywhere in the schema."""
    if isinstance(node, dict):
        types = node.get("type")
        if types in ("number", "integer") or (isinstance(types, list) and {"number", "integer"} & set(types)):
            yield path, node
        for key, value in node.items():
            yield from _numbers(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _numbers(value, f"{path}[{i}]")


def test_every_number_of_the_schema_has_a_range_its_default_fits():
    """Every number and integer, seeds and the demo's split sizes included, has a lower
    bound (NaN and inf are refused by validate_config before the schema), and its default,
    where it has one, lies inside its bounds."""
    numbers = dict(_numbers(SCHEMA))
    assert len(numbers) > 100  # the walk reaches $defs and nested sections
    for path, spec in numbers.items():
        assert "minimum" in spec or "exclusiveMinimum" in spec, f"{path} has no lower bound"
        if "default" in spec:
            d = spec["default"]
            assert d >= spec.get("minimum", -math.inf) and d > spec.get("exclusiveMinimum", -math.inf), path
            assert d <= spec.get("maximum", math.inf) and d < spec.get("exclusiveMaximum", math.inf), path
        if path.endswith(".seed"):  # numpy's seeds are non-negative; seed * 1_000_003 + epoch stays < 2**64
            assert spec["minimum"] == 0 and spec["maximum"] == 2**32 - 1, path


def test_every_folder_the_workflow_writes_under_results_is_a_reserved_name():
    """An experiment or ensemble named like one of the workflow's own folders under results/
    (rules/, rules/common/) would write into it: the schema refuses those names."""
    import re

    rules = "".join(p.read_text() for p in (Path(__file__).parents[2] / "rules").rglob("*.smk"))
    own = set(re.findall(r"results/([A-Za-z0-9_]+)(?=[/.\"])", rules))
    assert own and "demo" in own and "features" in own
    reserved = set(SCHEMA["$defs"]["name"]["not"]["enum"])
    assert own <= reserved, f"not reserved: {sorted(own - reserved)}"


def _registries():
    from captionflow.models import CAPTIONERS
    from captionflow.models.retrieval import RETRIEVAL

    return [(registry, name) for registry in (CAPTIONERS, RETRIEVAL) for name in sorted(registry.classes)]


@pytest.mark.parametrize("registry, name", _registries(), ids=lambda x: getattr(x, "kind", x))
def test_model_args_values_are_checked_against_the_constructors_defaults(registry, name):
    """A size or count (an int default) must be a positive int (a layer count: >= 0), a dropout (a float default
    named *dropout*) a probability in [0, 1), a flag (a bool default) a bool; every default
    passes its own check."""
    import inspect

    params = inspect.signature(registry.classes[name].__init__).parameters
    defaults = {k: p.default for k, p in params.items() if k in registry.options(name) and p.default is not p.empty}
    assert list(registry.bad_values(name, defaults)) == []
    for option, default in defaults.items():
        if isinstance(default, bool):
            assert list(registry.bad_values(name, {option: 1})) == [(option, "1 must be true or false")]
        elif isinstance(default, int) and option.endswith("layers"):  # 0 layers: an ablation
            assert list(registry.bad_values(name, {option: 0})) == []
            for bad in (-1, 2.0, True):
                assert list(registry.bad_values(name, {option: bad})) == [(option, f"{bad!r} must be a non-negative integer")]
        elif isinstance(default, int):
            for bad in (0, -1, 2.0, True):
                assert list(registry.bad_values(name, {option: bad})) == [(option, f"{bad!r} must be a positive integer")]
        elif isinstance(default, float) and "dropout" in option:
            assert list(registry.bad_values(name, {option: 0})) == []
            for bad in (1, 1.0, -0.1, "0.1"):
                assert list(registry.bad_values(name, {option: bad})) == [(option, f"{bad!r} must be a probability from 0 up to (not including) 1")]
    assert any(isinstance(d, int) and not isinstance(d, bool) for d in defaults.values())
