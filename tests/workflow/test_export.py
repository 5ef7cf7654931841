"""Bundles, ensembles and ONNX through real Snakemake: export_model in `all`, an ensemble
evaluated and reported beside its members, export_onnx on request, `-R` by stage name."""

import json
import subprocess
import sys

import pytest

from tests.workflow.conftest import TINY, Workflow, jobs, merge

# its ensemble test took 202 s in a make test run sharing its 2 cores with a demo
pytestmark = pytest.mark.timeout(600)

SMALL = {"threads": 1, "xe": {"epochs": 2, "batch_size": 8}, "evaluate": {"beam_size": 2}}
CONFIG = merge(
    TINY,
    {
        "experiments": {
            "a": {"model": "fc", "model_args": {"embed_size": 16, "hidden_size": 32}, **SMALL},
            "b": {
                "model": "show_attend_tell",
                "model_args": {"embed_size": 16, "hidden_size": 32, "att_size": 16},
                **SMALL,
                "retrieval": {"epochs": 2, "model_args": {"embed_size": 16, "hidden_size": 16, "units": 16}},
            },
        },
        "ensembles": {"ab": {"members": ["a", "b"], "threads": 1, "evaluate": {"beam_size": 2}}},
    },
)


def _caption(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "captionflow.cli", "caption", *args, "--format", "jsonl", "-q"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return {json.loads(line)["file_path"]: json.loads(line)["caption"] for line in proc.stdout.splitlines()}


@pytest.mark.slow
def test_ensemble_is_evaluated_reported_and_exported_and_onnx_captions_match(tmp_path):
    workflow = Workflow(tmp_path / "wf", CONFIG)
    proc = workflow.run()
    counts = jobs(proc)
    assert counts["evaluate_ensemble_job"] == 1 and counts["report_ensemble_job"] == 1
    assert counts["export_model_job"] == 2 and counts["export_ensemble_job"] == 1
    assert "export_onnx_job" not in counts  # on request only
    assert counts["train_retrieval_job"] == 1 and counts["evaluate_retrieval_job"] == 1  # b's retrieval model, in `all`
    retrieval = json.loads((workflow / "results/b/test/retrieval/metrics.json").read_text())
    assert set(retrieval["text_to_image"]) == {"R@1", "R@5", "R@10", "mAP"} and retrieval["images"] == 6
    assert "b retrieval (gna_rnn, test): text-to-image R@1" in proc.stderr
    table = [row.split("\t") for row in (workflow / "results/ab/test/metrics.tsv").read_text().splitlines()]
    assert [row[0] for row in table] == ["stage", "a_xe", "b_xe", "ensemble"]
    assert all(row[table[0].index("CIDEr")] for row in table[1:])
    assert "ab (test split)" in proc.stderr and "captionflow caption IMAGES... --model results/ab/export" in proc.stderr

    # the ensemble's bundle captions the test images as its evaluate stage did
    predictions = json.loads((workflow / "results/ab/test/ensemble/predictions.json").read_text())
    images = [str(workflow / "results/demo" / p["file_path"]) for p in predictions]
    got = _caption(*images, "--model", str(workflow / "results/ab/export"))
    assert [got[i] for i in images] == [p["caption"] for p in predictions]

    # ONNX on request, by the stage's name; onnxruntime captions as PyTorch does
    assert jobs(workflow.run("export_onnx")) == {"export_onnx_job": 2, "export_onnx": 1}
    bundle = str(workflow / "results/b/export")
    assert _caption(*images, "--model", bundle, "--onnx", bundle + "/onnx") == _caption(*images, "--model", bundle)

    # a forced rerun by name re-exports every bundle and nothing else
    assert jobs(workflow.run("-R", "export_model", "--until", "export_model")) == {
        "export_model_job": 2,
        "export_ensemble_job": 1,
        "export_model": 1,
    }


def test_an_ensemble_of_an_unknown_experiment_is_one_line(tmp_path):
    workflow = Workflow(tmp_path / "wf", merge(CONFIG, {"ensembles": {"ab": {"members": ["a", "zz"]}}}))
    proc = workflow.run("-n", check=False)
    assert proc.returncode != 0
    assert (
        "invalid config at ensembles.ab.members: 'zz' is not an experiment of this config (a, b)"
        in proc.stdout + proc.stderr
    )
