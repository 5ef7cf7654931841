"""Config values that become paths or model sizes, through a dry run of the real Snakefile:
names that would leave the working directory, or write into the workflow's own folders
under results/, and model sizes that are not positive stop the DAG build in one line
before any job."""

import pytest

from tests.workflow.conftest import TINY, Workflow, merge

FC = {"model": "fc", "model_args": {"embed_size": 16, "hidden_size": 32}, "stages": ["xe"]}
RESERVED = "data, demo, features, prefetch, report"


def _refused(tmp_path, over):
    """Dry-run `TINY + over` in tmp_path/run/wf -> its one `invalid config` line; nothing may
    appear beside the working directory, nor results/ in it."""
    workflow = Workflow(tmp_path / "run" / "wf", merge(TINY, over))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    proc = workflow.run("-n", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    lines = [line for line in out.splitlines() if line.startswith("invalid config")]
    assert len(lines) == 1, out[-2000:]
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if ".snakemake" not in p.parts)
    assert after == before and not (workflow / "results").exists()
    return lines[0]


@pytest.mark.parametrize("backbone", ["../../../x", "/tmp/x", "a/b", "..", ".x", "x y"])
def test_a_backbone_that_is_not_a_safe_name_is_refused(tmp_path, backbone):
    assert _refused(tmp_path, {"features": {"backbone": backbone}}) == (
        f"invalid config at features.backbone: {backbone!r} is not a safe name (letters, digits, "
        "underscores and dots, starting with a letter or digit); it names a folder under results/"
    )


@pytest.mark.parametrize("backbone", ["swin_large_patch4_window12_384", "vit_base_patch16_224.augreg_in21k"])
def test_timm_names_are_safe_backbones(tmp_path, backbone):
    workflow = Workflow(tmp_path / "wf", merge(TINY, {"features": {"backbone": backbone}}))
    proc = workflow.run("-n")
    assert f"results/features/{backbone}/train.h5" in proc.stdout + proc.stderr


@pytest.mark.parametrize("section", ["experiments", "ensembles"])
@pytest.mark.parametrize("name", ["../x", "a/b", ".x", "a.b"])
def test_an_experiment_or_ensemble_name_that_is_not_a_safe_name_is_refused(tmp_path, section, name):
    over = (
        {"experiments": {name: FC}}
        if section == "experiments"
        else {
            "experiments": {"a": FC, "b": FC},
            "ensembles": {name: {"members": ["a", "b"]}},
        }
    )
    assert _refused(tmp_path, over) == (
        f"invalid config at {section}.{name}: {name!r} is not a safe name (letters, digits and "
        "underscores); it names a folder under results/"
    )


@pytest.mark.parametrize("name", RESERVED.split(", "))
def test_the_workflows_own_folders_are_no_experiment_names(tmp_path, name):
    assert _refused(tmp_path, {"experiments": {name: FC}}) == (
        f"invalid config at experiments.{name}: {name!r} is reserved (the workflow's own folders "
        f"under results/: {RESERVED}); choose another name"
    )


def test_the_workflows_own_folders_are_no_ensemble_names(tmp_path):
    over = {"experiments": {"a": FC, "b": FC}, "ensembles": {"report": {"members": ["a", "b"]}}}
    assert _refused(tmp_path, over) == (
        "invalid config at ensembles.report: 'report' is reserved (the workflow's own folders "
        f"under results/: {RESERVED}); choose another name"
    )


@pytest.mark.parametrize(
    "experiment, key, why",
    [
        (
            {"retrieval": {"model": "gna_rnn", "model_args": {"units": 0}}},
            "retrieval.model_args.units",
            "0 must be a positive integer",
        ),
        (
            {"retrieval": {"model": "dual_encoder", "model_args": {"embed_size": -4}}},
            "retrieval.model_args.embed_size",
            "-4 must be a positive integer",
        ),
        ({"model_args": {"hidden_size": 0}}, "model_args.hidden_size", "0 must be a positive integer"),
        ({"model_args": {"hidden_size": 32.5}}, "model_args.hidden_size", "32.5 must be a positive integer"),
        (
            {"model_args": {"dropout": 1.0}},
            "model_args.dropout",
            "1.0 must be a probability from 0 up to (not including) 1",
        ),
        (
            {"model": "aoanet", "model_args": {"norm_first": "yes"}},
            "model_args.norm_first",
            "'yes' must be true or false",
        ),
        (
            {"model": "transformer", "model_args": {"region_embed_activation": "gelu"}},
            "model_args.region_embed_activation",
            "'gelu' must be one of none, relu",
        ),
    ],
)
def test_a_model_size_that_is_not_positive_is_refused(tmp_path, experiment, key, why):
    assert (
        _refused(tmp_path, {"experiments": {"x": merge(FC, experiment)}})
        == f"invalid config at experiments.x.{key}: {why}"
    )
