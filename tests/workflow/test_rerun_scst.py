"""A forced rerun of train_scst starts over from its start checkpoint; a killed one resumes.

Both end with the weights of an uninterrupted run (exact on the CPU).
"""

import pytest
import torch

from tests.workflow.conftest import TINY, Workflow, jobs, merge

SAT = merge(
    TINY,
    {
        "experiments": {
            "sat": {
                "model": "show_attend_tell",
                "model_args": {"embed_size": 32, "hidden_size": 64, "att_size": 32},
                "stages": ["xe", "scst"],
                "threads": 1,
                "xe": {"epochs": 1, "batch_size": 8},
                "scst": {"epochs": 3, "batch_size": 2, "checkpoint_every": 4},
                "evaluate": {"beam_size": 2},
            }
        }
    },
)
MODEL = "results/sat/scst/model.pt"
LOG = "logs/train_scst/sat.log"


def _weights(workflow):
    return torch.load(workflow / MODEL, weights_only=True)["model"]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_forced_scst_rerun_starts_over_and_a_killed_one_resumes_to_the_same_weights(tmp_path):
    workflow = Workflow(tmp_path / "wf", SAT)
    workflow.run("train_scst")
    fresh = _weights(workflow)
    assert not (workflow / "results/sat/scst/state").exists()
    xe = torch.load(workflow / "results/sat/xe/model.pt", weights_only=True)["model"]
    assert not _same(fresh, xe)  # SCST moved the weights

    # forced by the stage's name: retrains from the XE checkpoint, resumes nothing
    proc = workflow.run("-R", "train_scst", "--until", "train_scst")
    assert jobs(proc) == {"train_scst_job": 1, "train_scst": 1}
    log = (workflow / LOG).read_text()
    assert "resuming" not in log and "epoch 0:" in log and "epoch 2:" in log
    assert _same(_weights(workflow), fresh)

    # killed mid-epoch (after its first state, before the end), then run again: resumes
    state = workflow / "results/sat/scst/state/last.pt"
    assert workflow.run_until(state, "-R", "train_scst", "--until", "train_scst"), "SCST ended before its first state"
    killed_at = torch.load(state, weights_only=True)["progress"]
    assert 0 < killed_at["step"] < 3 * 14 and not (workflow / MODEL).exists()
    workflow.run("train_scst")
    assert f"resuming from results/sat/scst/state/last.pt: epoch {killed_at['epoch']}" in (workflow / LOG).read_text()
    assert _same(_weights(workflow), fresh)
    assert not state.exists()


@pytest.mark.slow
def test_an_unreadable_state_is_set_aside_and_training_starts_over(tmp_path):
    workflow = Workflow(tmp_path / "wf", SAT)
    workflow.run("train_xe")
    state = workflow / "results/sat/xe/state/last.pt"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"not a checkpoint")  # e.g. a disk that filled up mid-write
    workflow.run("-R", "train_xe", "--until", "train_xe")
    log = (workflow / "logs/train_xe/sat.log").read_text()
    assert "cannot be read" in log and "set aside as last.pt.unreadable, starting over" in log
    assert (workflow / "results/sat/xe/state/last.pt.unreadable").read_bytes() == b"not a checkpoint"
    assert (workflow / "results/sat/xe/model.pt").exists()
