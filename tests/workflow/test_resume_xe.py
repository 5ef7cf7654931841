"""train_xe SIGKILLed mid-epoch through real Snakemake resumes to identical weights.

(A file of its own so that `make test`'s two processes share the slow workflow tests evenly.)
"""

import pytest
import torch

from tests.workflow.conftest import Workflow
from tests.workflow.test_train_eval import TINY_SAT


@pytest.mark.slow
def test_train_xe_sigkill_mid_epoch_resumes_to_identical_weights(tmp_path):
    workflow = Workflow(tmp_path / "wf", TINY_SAT)
    workflow.run("extract_features")
    last = workflow / "results/sat/xe/state/last.pt"
    killed = workflow.run_until(last, "results/sat/xe/model.pt")
    assert killed, "training finished or failed before its first checkpoint"
    killed_at = torch.load(last, weights_only=True)["progress"]
    assert killed_at["step"] < 3 * 35 and not (workflow / "results/sat/xe/model.pt").exists()

    workflow.run("results/sat/xe/model.pt")
    assert "resuming from" in (workflow / "logs/train_xe/sat.log").read_text()
    resumed = torch.load(workflow / "results/sat/xe/model.pt", weights_only=True)

    assert not (workflow / "results/sat/xe/state").exists()  # nothing left to resume
    workflow.run("results/sat/xe/model.pt", "--forcerun", "train_xe_job")  # an uninterrupted run from scratch
    assert "resuming" not in (workflow / "logs/train_xe/sat.log").read_text()
    fresh = torch.load(workflow / "results/sat/xe/model.pt", weights_only=True)
    assert all(torch.equal(resumed["model"][k], fresh["model"][k]) for k in fresh["model"])
