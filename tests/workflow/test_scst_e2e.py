"""train_scst_e2e through real Snakemake: after [xe, e2e, scst] SCST goes on with the
backbone unfrozen; its own backbone makes its test features, it is evaluated beside the
other stages and exported with that backbone."""

import json

import pytest
import torch

from tests.workflow.conftest import TINY, Workflow, jobs, merge

# 101 s in a make test run sharing its 2 cores with a demo
pytestmark = pytest.mark.timeout(450)

SAT = {"model": "show_attend_tell", "model_args": {"embed_size": 16, "hidden_size": 32, "att_size": 16}, "threads": 1}
CONFIG = merge(
    TINY,
    {
        "experiments": {
            "a": {
                **SAT,
                "stages": ["xe", "e2e", "scst", "scst_e2e"],
                "xe": {"epochs": 1, "batch_size": 8},
                "e2e": {"epochs": 1, "batch_size": 8},
                "scst": {"epochs": 1, "batch_size": 8, "samples": 2},
                "scst_e2e": {"batch_size": 8, "backbone_lr": 1e-3, "freeze_stages": 3},
                "evaluate": {"beam_size": 2},
            }
        }
    },
)


@pytest.mark.slow
def test_scst_e2e_trains_the_backbone_is_evaluated_reported_and_exported(tmp_path):
    workflow = Workflow(tmp_path / "wf", CONFIG)
    proc = workflow.run()
    counts = jobs(proc)
    assert (
        counts["train_scst_e2e_job"] == 1
        and counts["regenerate_scst_e2e_features_job"] == 1
        and counts["evaluate_job"] == 4
    )
    tuned = torch.load(workflow / "results/a/scst_e2e/backbone.pth", weights_only=True)
    before = torch.load(workflow / "results/a/e2e/backbone.pth", weights_only=True)
    moved = {k for k in tuned if tuned[k].is_floating_point() and not torch.equal(tuned[k], before[k])}
    assert any(k.startswith("trunk.7.") for k in moved) and not any(
        k.startswith("trunk.0.") for k in moved
    )  # layer4 trained, stem frozen

    history = (workflow / "results/a/scst_e2e/history.tsv").read_text().splitlines()
    assert history[0].split("\t")[-2:] == ["reward", "baseline"] and len(history) == 2
    assert "end to end (backbone unfrozen)" in (workflow / "results/a/scst_e2e/reward.txt").read_text()
    metrics = json.loads((workflow / "results/a/test/scst_e2e/metrics.json").read_text())
    assert metrics["stage"] == "scst_e2e" and metrics["metrics"]["CIDEr"] >= 0
    table = (workflow / "results/a/test/metrics.tsv").read_text().splitlines()
    assert [row.split("\t")[0] for row in table[1:]] == ["xe", "e2e", "scst", "scst_e2e"]
    assert "logs/train_scst_e2e/a.log" in proc.stderr  # the end-of-run summary lists the stage

    bundle = torch.load(workflow / "results/a/export/bundle.pt", weights_only=True)
    assert all(torch.equal(bundle["backbone"]["weights"][k], tuned[k]) for k in tuned)
