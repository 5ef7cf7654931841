"""The source systems' presets (presets/*.yaml): valid configs whose models build at full size,
and whose resolved settings equal the source-to-key tables of docs/presets.md, row by row."""

import copy
import inspect
import re
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from captionflow.config import _properties, schema, section_defaults
from captionflow.models import create_model
from captionflow.models.registry import MODELS
from captionflow.models.retrieval import RETRIEVAL, create_retrieval_model

ROOT = Path(__file__).parents[2]
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))
DOC = ROOT / "docs/presets.md"
FEAT_DIM = {"resnet101": 2048, "bottomup_tsv": 2048, "swin_large_patch4_window12_384": 1536, "vgg16": 512}
# Parameter counts with a 10k vocabulary (10,001 outputs), worked out by hand from the layers:
# a layer that grows or loses a projection changes them. show_attend_tell (E 512, H 1800,
# A 512, 2048-d regions): embedding 5,120,512 + attention 1,971,713 + init_h/init_c
# 7,376,400 + beta 1,801 + LSTM cell (2560 -> 1800) 31,406,400 + out_h 922,112 + out_z
# 1,049,088 + logit 5,130,513. fc (E = H = 128, 2048-d): image embedding 262,272 + word
# embedding 1,280,128 + LSTM cell 132,096 + logit 1,290,129. The published gna_rnn (a
# retrieval model: 10,001 embedding rows, 512-d pooled VGG-16 features, every size 512):
# word embedding 5,120,512 + image embedding fc-BN-fc 526,336 + LSTM ([word ; image] 1024
# -> 512, two biases) 3,149,824 + visual units fc-BN-fc 526,336 + unit attention 262,656 +
# word gate 513 + affinity bias 1 (the source's fc layers read 4096-d fc7: more there).
PARAMETERS = {
    "aoanet_coco": 86_613_777,  # + the final LayerNorm of the pre-norm refiner (2 x 1024)
    "expansionnet_v2_coco": 38_598_417,
    "show_attend_tell_coco": 52_978_539,
    "nic_es_coco": 2_964_625,
    "nic_nes_coco": 2_964_625,
    "gna_rnn_cuhk_pedes": 9_586_178,
}
# Sections of the config itself (not of the preset's experiment) a table row may name.
TOP_LEVEL = ("data", "resize", "labels", "features")
STAGES = ("xe", "e2e", "scst", "es", "evaluate")  # and `retrieval` (with `retrieval.model_args.`)


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_is_a_valid_config_and_its_models_build(path, report_figure):
    config = yaml.safe_load(path.read_text())
    validate(config, str(ROOT / "captionflow/config.schema.yaml"))  # fills defaults, raises on a bad key
    feat_dim = FEAT_DIM[config["features"]["backbone"]]
    for experiment in config["experiments"].values():
        if "model" in experiment:
            name, build_model, args = experiment["model"], create_model, experiment["model_args"]
        else:  # a retrieval-only experiment: its retrieval model is what it trains
            retrieval = experiment["retrieval"]
            name, build_model, args = retrieval["model"], create_retrieval_model, retrieval.get("model_args", {})
        model = build_model(name, vocab_size=10000, feat_dim=feat_dim, **args)
        count = sum(p.numel() for p in model.parameters())
        report_figure(
            f"preset {path.stem}: {name} {count / 1e6:.1f} M parameters (vocabulary 10000, {feat_dim}-d features)"
        )
        assert count == PARAMETERS[path.stem]


def doc_tables(text):
    """{preset stem: [(source setting, key, value text)]} from docs/presets.md: each
    `## \\`presets/<stem>.yaml\\`` section's table, one entry per `key` = `value` pair of the
    middle column."""
    tables = {}
    stem = None
    for line in text.splitlines():
        heading = re.fullmatch(r"## `presets/(\w+)\.yaml`", line.strip())
        if heading:
            stem = heading.group(1)
            tables[stem] = []
        elif line.startswith("## "):
            stem = None
        elif stem and line.startswith("|") and not line.startswith("| ---"):
            cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
            if cells[0] == "source setting (file: option = value)":
                continue
            assert len(cells) == 3, f"docs/presets.md, {stem}: a row needs 3 cells: {line}"
            pairs = re.findall(r"`([\w.]+)` = `([^`]*)`", cells[1])
            assert pairs or cells[1] == "—", f"docs/presets.md, {stem}: middle cell is neither pairs nor a dash: {line}"
            tables[stem] += [(cells[0], key, value) for key, value in pairs]
    return tables


TABLES = doc_tables(DOC.read_text())
ROWS = [(stem, key, value) for stem, rows in TABLES.items() for _, key, value in rows]


def test_every_preset_has_its_table():
    assert sorted(TABLES) == [p.stem for p in PRESETS]
    assert all(TABLES.values())


def _defaults(section):
    """{key: schema default} of a top-level config section."""
    return {key: prop["default"] for key, prop in schema()["properties"][section]["properties"].items()}


def resolve(config, key):
    """The value `key` (a docs/presets.md table key) takes in preset `config` once the schema's
    defaults (and, for model_args, the model constructor's) fill what the preset leaves out;
    KeyError when the schema or the model has no such key."""
    head, _, rest = key.partition(".")
    (experiment,) = config["experiments"].values()
    if head in TOP_LEVEL:
        known = _defaults(head)
        given = config.get(head, {})
    elif head in STAGES:
        known = section_defaults(head)
        given = experiment.get(head, {})
    elif head == "scst_e2e":
        # as the rules build it: the experiment's scst (filled) with its scst_e2e (filled) on top
        own = {k: p["default"] for k, p in _properties("$defs.scst_e2e").items()}
        scst = section_defaults("scst")
        inherited = {k: v for k, v in experiment.get("scst", {}).items() if k in scst}  # schema keys only
        known = {**scst, **inherited, **own}
        given = experiment.get("scst_e2e", {})
    elif head == "retrieval" and rest.startswith("model_args."):
        section = {**section_defaults("retrieval"), **experiment.get("retrieval", {})}
        signature = inspect.signature(RETRIEVAL.classes[section["model"]].__init__).parameters
        known = {name: p.default for name, p in signature.items() if p.default is not inspect.Parameter.empty}
        given, rest = section["model_args"], rest.partition(".")[2]
    elif head == "retrieval":
        known, given = section_defaults("retrieval"), experiment.get("retrieval", {})
    elif head == "model_args":
        signature = inspect.signature(MODELS[experiment["model"]].__init__).parameters
        known = {name: p.default for name, p in signature.items() if p.default is not inspect.Parameter.empty}
        given = experiment.get("model_args", {})
    elif not rest:
        known = {k: p.get("default") for k, p in schema()["$defs"]["experiment"]["properties"].items()}
        given, rest = experiment, head
    else:
        raise KeyError(key)
    if rest not in known:
        raise KeyError(key)
    return copy.deepcopy({**known, **given}[rest])


@pytest.mark.parametrize("stem, key, value", ROWS, ids=[f"{s}:{k}" for s, k, _ in ROWS])
def test_preset_setting_equals_its_table_row(stem, key, value):
    config = yaml.safe_load((ROOT / f"presets/{stem}.yaml").read_text())
    try:
        resolved = resolve(config, key)
    except KeyError:
        pytest.fail(f"{stem}: {key} is not a key of the schema or the model (not merged yet?)")
    expected = yaml.safe_load(value)
    if isinstance(resolved, tuple):
        resolved = list(resolved)
    assert resolved == expected and type(resolved) is type(expected), (
        f"{stem}: {key} is {resolved!r}, table says {expected!r}"
    )


def test_the_table_reader_resolves_defaults_and_refuses_unknown_keys():
    """The reader is checked on a config written here: a left-out key takes the schema's
    default, a given one its value, scst_e2e inherits scst, and an unknown key is refused."""
    config = {
        "experiments": {
            "e": {
                "model": "fc",
                "model_args": {"hidden_size": 32},
                "scst": {"lr": 3.0e-4, "samples": 7},
                "scst_e2e": {"epochs": 2},
            }
        },
        "labels": {"max_len": 7},
    }
    assert resolve(config, "labels.max_len") == 7
    assert (
        resolve(config, "labels.word_count_threshold")
        == schema()["properties"]["labels"]["properties"]["word_count_threshold"]["default"]
    )
    assert resolve(config, "model_args.hidden_size") == 32
    assert resolve(config, "model_args.embed_size") == 256  # ShowAndTell's constructor default
    assert resolve(config, "scst_e2e.lr") == _properties("$defs.scst_e2e")["lr"]["default"]  # its own key
    assert resolve(config, "scst_e2e.samples") == 7  # the experiment's scst, inherited
    assert resolve(config, "scst_e2e.temperature") == _properties("$defs.scst")["temperature"]["default"]
    assert resolve(config, "scst_e2e.epochs") == 2
    assert resolve(config, "stages") == ["xe"]
    config["experiments"]["e"]["scst"]["no_such_key"] = 1  # given under scst, not a schema key
    for bad in ("xe.no_such_key", "model_args.no_such_option", "nonsense.lr", "scst_e2e.no_such_key"):
        with pytest.raises(KeyError):
            resolve(config, bad)


def test_the_table_reader_resolves_a_retrieval_only_experiment():
    """`retrieval.` keys of an experiment without `model:`: the section's given value, else the
    schema's default; `retrieval.model_args.` ones the retrieval model's constructor's."""
    config = {"experiments": {"r": {"retrieval": {"model": "dual_encoder", "lr": 4.0e-4, "model_args": {"units": 8}}}}}
    assert resolve(config, "retrieval.lr") == 4.0e-4
    assert resolve(config, "retrieval.neg_time") == _properties("$defs.retrieval")["neg_time"]["default"]
    assert resolve(config, "retrieval.model_args.units") == 8
    assert resolve(config, "retrieval.model_args.embed_size") == 300  # DualEncoder's constructor default
    for bad in ("retrieval.no_such_key", "retrieval.model_args.no_such_option", "model_args.units"):
        with pytest.raises(KeyError):
            resolve(config, bad)
