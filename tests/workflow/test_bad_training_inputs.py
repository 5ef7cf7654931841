"""Bad training inputs through real Snakemake: refused in one line, nothing trusted is left.

A NaN in the config stops the workflow before any job; garbage feature rows stop
train_xe_job with one `error:` line and no checkpoint; a checkpoint that carries code is
refused with our line, and its code never runs.
"""

import shutil

import h5py
import numpy as np
import pytest
import torch

from tests.unit.test_bad_inputs import CodeCarrier
from tests.workflow.conftest import Workflow, jobs, merge
from tests.workflow.test_train_eval import TINY_SAT

# test_train_eval's tiny show_attend_tell, smaller and shorter: one epoch, a state every step
SAT = merge(
    TINY_SAT,
    {
        "experiments": {
            "sat": {
                "model_args": {"embed_size": 16, "hidden_size": 32, "att_size": 16},
                # no warmup, no scheduled sampling: a diverging learning rate acts at once
                "xe": {"epochs": 1, "batch_size": 8, "checkpoint_every": 1, "warmup_steps": 0, "ss_k": 0.0},
                "evaluate": {"beam_size": 1},
            }
        }
    },
)
FEATURES = "results/features/resnet18"


def _with(section, key, value):
    return merge(SAT, {"experiments": {"sat": {section: {**SAT["experiments"]["sat"].get(section, {}), key: value}}}})


@pytest.mark.parametrize(
    "config, line",
    [
        (_with("xe", "lr", float("nan")), "invalid config at experiments.sat.xe.lr: .nan is not a finite number"),
        (
            _with("xe", "label_smoothing", float("inf")),
            "invalid config at experiments.sat.xe.label_smoothing: .inf is not a finite number",
        ),
        (
            _with("scst", "temperature", float("-inf")),
            "invalid config at experiments.sat.scst.temperature: -.inf is not a finite number",
        ),
        (
            _with("model_args", "dropout", float("nan")),
            "invalid config at experiments.sat.model_args.dropout: .nan is not a finite number",
        ),
        (
            _with("xe", "label_smoothing", 1.5),
            "invalid config at experiments.sat.xe.label_smoothing: 1.5 is greater than the maximum of 1",
        ),
        (_with("xe", "lr", 0), "invalid config at experiments.sat.xe.lr: 0 is less than or equal to the minimum of 0"),
    ],
)
def test_non_finite_or_out_of_range_numbers_are_refused_before_any_job(tmp_path, config, line):
    workflow = Workflow(tmp_path / "wf", config)
    proc = workflow.run("-n", check=False)
    assert proc.returncode != 0 and line in proc.stdout + proc.stderr
    assert not jobs(proc)


def test_nan_lr_is_refused_before_any_job_runs(tmp_path):
    workflow = Workflow(tmp_path / "wf", _with("xe", "lr", float("nan")))
    assert ".nan" in (workflow / "config.yaml").read_text()
    proc = workflow.run(check=False)
    out = proc.stdout + proc.stderr
    assert (
        proc.returncode != 0 and out.count("invalid config at experiments.sat.xe.lr: .nan is not a finite number") == 1
    )
    assert not jobs(proc) and not (workflow / "results").exists() and not (workflow / "logs").exists()


@pytest.fixture(scope="module")
def data_stages(tmp_path_factory):
    """A workflow directory whose data stages ran (features extracted), to copy per test."""
    workflow = Workflow(tmp_path_factory.mktemp("data") / "wf", SAT)
    workflow.run(f"{FEATURES}/train.h5", f"{FEATURES}/val.h5", f"{FEATURES}/test.h5")
    return workflow.path


def _copy(data_stages, tmp_path):
    shutil.copytree(data_stages, tmp_path / "wf", symlinks=True)  # keeps mtimes: nothing reruns
    return Workflow(tmp_path / "wf", SAT)


def test_garbage_feature_rows_stop_train_xe_with_one_line_and_no_checkpoint(data_stages, tmp_path):
    workflow = _copy(data_stages, tmp_path)
    with h5py.File(workflow / f"{FEATURES}/train.h5", "r+") as f:
        att = f["att"][()]
        att[2] = np.nan
        att[9, 0] = np.inf
        f["att"][...] = att
        image_id = int(f["image_id"][2])
    proc = workflow.run("results/sat/xe/model.pt", check=False)
    assert proc.returncode != 0 and jobs(proc) == {"train_xe_job": 1}  # the data stages do not rerun
    log = (workflow / "logs/train_xe/sat.log").read_text()
    errors = [ln for ln in log.splitlines() if ln.startswith("error:")]
    assert errors == [
        f"error: features {FEATURES}/train.h5: row 2 (image {image_id}) of att holds NaN or inf values (2 such rows of 28 read); "
        "training on them gives NaN weights: delete it and rerun snakemake to extract the features again "
        "(if they come back so, check features.weights)"
    ]
    assert "Traceback" not in log
    assert (
        not (workflow / "results/sat/xe/model.pt").exists() and not (workflow / "results/sat/xe/history.tsv").exists()
    )
    assert not (workflow / "results/sat/xe/state").exists()  # refused before training: no state at all


def test_a_learning_rate_that_diverges_never_becomes_a_checkpoint(data_stages, tmp_path):
    """xe.lr 1e30 is a finite number the schema lets through: the loss turns NaN at the
    second step, and the run stops there, naming the learning rate."""
    workflow = _copy(data_stages, tmp_path)
    workflow.set_config(_with("xe", "lr", 1e30))
    proc = workflow.run("results/sat/xe/model.pt", check=False)
    assert proc.returncode != 0 and jobs(proc) == {"train_xe_job": 1}
    log = (workflow / "logs/train_xe/sat.log").read_text()
    errors = [ln for ln in log.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in log
    assert errors[0].startswith(
        "error: train_xe stopped at epoch 0, step 2: the loss is nan and the gradient norm is nan; "
    )
    assert (
        "likely cause: a learning rate too high for this model (xe.lr = 1e+30: lower it or raise xe.warmup_steps)"
        in errors[0]
    )
    assert (
        not (workflow / "results/sat/xe/model.pt").exists() and not (workflow / "results/sat/xe/history.tsv").exists()
    )
    for state in (workflow / "results/sat/xe").rglob("*.pt"):  # the state of step 1 (checkpoint_every 1) is finite
        weights = torch.load(state, weights_only=True)["model"]
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_code_carrying_checkpoint_is_refused_with_our_line_first(data_stages, tmp_path):
    workflow = _copy(data_stages, tmp_path)
    marker = tmp_path / "code_ran"
    (workflow / "results/sat/xe").mkdir(parents=True)
    torch.save({"model": {}, "payload": CodeCarrier(marker)}, workflow / "results/sat/xe/model.pt")
    proc = workflow.run("results/sat/test/xe/metrics.json", check=False)
    assert proc.returncode != 0 and jobs(proc) == {"evaluate_job": 1}
    log = (workflow / "logs/evaluate/sat_xe.log").read_text()
    assert log.splitlines()[0].startswith(
        "error: checkpoint results/sat/xe/model.pt is not a captionflow checkpoint: it holds Python objects (posix.system) "
        "that safe (weights_only) loading refuses"
    )
    assert len(log.splitlines()) == 1 and "Re-running" not in proc.stdout + proc.stderr
    assert not marker.exists() and not (workflow / "results/sat/test/xe/metrics.json").exists()
