"""Config flows one way: the schema holds every default, the stages' settings dataclasses
hold none and are built from a config section by captionflow.config.build."""

import dataclasses
import importlib
import math
import pkgutil
from pathlib import Path

import pytest
import yaml

import captionflow
from captionflow.config import BACKBONE_KEYS, SCHEDULING, SECTIONS, build, renamed_key_message, section_defaults
from captionflow.errors import CaptionflowError
from captionflow.evaluation.captioning import DecodingConfig
from captionflow.features.extract import FeatureConfig
from captionflow.features.regions import RegionConfig
from captionflow.training.e2e import E2EConfig
from captionflow.training.es import ESConfig
from captionflow.training.retrieval import RetrievalConfig
from captionflow.training.scst_e2e import SCSTE2EConfig
from captionflow.training.self_critical import SCSTConfig
from captionflow.training.xe import XEConfig

SCHEMA = yaml.safe_load((Path(captionflow.__file__).parent / "config.schema.yaml").read_text())
SETTINGS = [
    XEConfig,
    E2EConfig,
    SCSTConfig,
    SCSTE2EConfig,
    ESConfig,
    RetrievalConfig,
    DecodingConfig,
    FeatureConfig,
    RegionConfig,
]


def _settings_classes():
    """Every dataclass of the library that names a config section (SECTION)."""
    found = set()
    for info in pkgutil.walk_packages(captionflow.__path__, "captionflow."):
        if info.name.startswith("captionflow.deploy.onnx"):
            continue  # needs onnx; holds no settings
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if dataclasses.is_dataclass(value) and isinstance(value, type) and "SECTION" in vars(value):
                found.add(value)
    return found


def test_every_settings_dataclass_is_listed_and_names_a_section():
    assert _settings_classes() == set(SETTINGS)
    assert {cls.SECTION for cls in SETTINGS} == set(SECTIONS)


@pytest.mark.parametrize("cls", SETTINGS, ids=lambda c: c.__name__)
def test_a_default_is_written_once_in_the_schema_not_in_a_dataclass(cls):
    restated = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    assert restated == [], f"{cls.__name__} restates the schema's defaults of {restated}"


@pytest.mark.parametrize("cls", SETTINGS, ids=lambda c: c.__name__)
def test_a_settings_dataclass_has_exactly_the_keys_of_its_sections(cls):
    """Its fields are its schema sections' keys minus the scheduler's (gpus, runtime,
    threads, mem_mb: read by the rules for resources and torchrun) and minus the keys of
    the section another settings takes (features: grid vs region extraction)."""
    paths, not_own = SECTIONS[cls.SECTION]
    keys = set()
    for path in paths:
        node = SCHEMA["$defs"][path[6:]] if path.startswith("$defs.") else SCHEMA["properties"][path]
        keys |= set(node.get("properties", {path: node}))
    assert set(not_own) <= keys  # no stale exclusion
    assert {f.name for f in dataclasses.fields(cls)} == keys - set(SCHEDULING) - set(not_own)


def test_every_key_of_the_features_section_reaches_an_extraction_or_the_scheduler():
    keys = set(SCHEMA["properties"]["features"]["properties"])
    used = (
        set(section_defaults("features")) | set(section_defaults("regions")) | set(SCHEDULING) | {"tsv"}
    )  # tsv: import_bottomup
    used |= set(
        BACKBONE_KEYS
    )  # the network's: rules/common/config_values.smk's BACKBONE, a features.backbones.Backbone
    assert keys <= used


def test_a_settings_built_from_a_partial_section_takes_the_rest_from_the_schema():
    cfg = build(XEConfig, {"epochs": 1})
    expected = {k: v["default"] for k, v in SCHEMA["$defs"]["xe"]["properties"].items() if k not in SCHEDULING}
    assert dataclasses.asdict(cfg) == {**expected, "epochs": 1}
    assert build(XEConfig, {"epochs": 1}, lr=0.5).lr == 0.5  # keywords over the dict


def test_scst_e2e_library_defaults_are_the_schemas_scst_e2e_values():
    """train_scst_e2e's settings are the experiment's scst section with its scst_e2e section
    on top: built without a key, they take scst_e2e's defaults (epochs 1, batch_size 10,
    lr 1e-5), not scst's (5, 25, 5e-5), and scst's for the keys scst_e2e does not have."""
    cfg = build(SCSTE2EConfig)
    scst = {k: v["default"] for k, v in SCHEMA["$defs"]["scst"]["properties"].items() if k not in SCHEDULING}
    scst_e2e = {k: v["default"] for k, v in SCHEMA["$defs"]["scst_e2e"]["properties"].items() if k not in SCHEDULING}
    assert (
        (cfg.epochs, cfg.batch_size, cfg.lr)
        == (scst_e2e["epochs"], scst_e2e["batch_size"], scst_e2e["lr"])
        == (1, 10, 1e-5)
    )
    assert dataclasses.asdict(cfg) == {**scst, **scst_e2e}


def test_an_unknown_or_renamed_key_is_refused_in_one_line():
    with pytest.raises(CaptionflowError, match=r"^unknown key xe\.epoch \(allowed: .*epochs.*\)$"):
        build(XEConfig, {"epoch": 3})
    with pytest.raises(CaptionflowError, match=r"^e2e\.amp was renamed: write e2e\.precision$"):
        build(E2EConfig, {"amp": "bf16"})
    with pytest.raises(CaptionflowError, match="unknown key xe.runtime"):  # the scheduler's, not the stage's
        build(XEConfig, runtime=5)
    # the workflow's validation (rules/common.smk) words a renamed key the same way
    assert renamed_key_message("labels", "max_length") == "labels.max_length was renamed: write labels.max_len"


def test_e2e_precision_keeps_the_effective_default_of_amp():
    """e2e.amp (none|bf16|fp16, default bf16) became e2e.precision (fp32|bf16|fp16) like every
    other section; its default stays bf16 on CUDA (the CPU trains in float32)."""
    spec = SCHEMA["$defs"]["e2e"]["properties"]["precision"]
    assert spec["default"] == "bf16" and spec["enum"] == ["fp32", "bf16", "fp16"]
    assert "amp" not in SCHEMA["$defs"]["e2e"]["properties"]


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
        if name in (
            "epochs",
            "batch_size",
            "max_len",
            "samples",
            "patience",
            "accumulate",
            "beam_size",
            "chunk_batches",
        ):
            assert spec.get("minimum", 0) >= 1, key
        if name in ("checkpoint_every", "checkpoint_minutes"):  # 0: that trigger is off
            assert spec["minimum"] == 0, key


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
        if "default" in spec and not (spec["default"] is None and "null" in spec["type"]):  # null: unset
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
    named *dropout*) a probability in [0, 1), a flag (a bool default) a bool, a named choice (the class's
    option_choices) one of its names, the default among them; every default passes its own check."""
    import inspect

    params = inspect.signature(registry.classes[name].__init__).parameters
    defaults = {k: p.default for k, p in params.items() if k in registry.options(name) and p.default is not p.empty}
    assert list(registry.bad_values(name, defaults)) == []
    choices = getattr(registry.classes[name], "option_choices", {})
    for option, default in defaults.items():
        if option in choices:
            assert default in choices[option]
            for good in choices[option]:
                assert list(registry.bad_values(name, {option: good})) == []
            for bad in ("gelu", None, True):
                assert list(registry.bad_values(name, {option: bad})) == [
                    (option, f"{bad!r} must be one of {', '.join(choices[option])}")
                ]
        elif isinstance(default, bool):
            assert list(registry.bad_values(name, {option: 1})) == [(option, "1 must be true or false")]
        elif isinstance(default, int) and option.endswith("layers"):  # 0 layers: an ablation
            assert list(registry.bad_values(name, {option: 0})) == []
            for bad in (-1, 2.0, True):
                assert list(registry.bad_values(name, {option: bad})) == [
                    (option, f"{bad!r} must be a non-negative integer")
                ]
        elif isinstance(default, int):
            for bad in (0, -1, 2.0, True):
                assert list(registry.bad_values(name, {option: bad})) == [
                    (option, f"{bad!r} must be a positive integer")
                ]
        elif isinstance(default, float) and "dropout" in option:
            assert list(registry.bad_values(name, {option: 0})) == []
            for bad in (1, 1.0, -0.1, "0.1"):
                assert list(registry.bad_values(name, {option: bad})) == [
                    (option, f"{bad!r} must be a probability from 0 up to (not including) 1")
                ]
    assert any(isinstance(d, int) and not isinstance(d, bool) for d in defaults.values())
