"""The configurable stage graph: each allowed stage list is a valid DAG (dry runs)."""

import pytest

from tests.workflow.conftest import TINY, Workflow, jobs, merge

DATA = {"make_demo_dataset": 1, "resize_images": 1, "prepro_labels": 1, "extract_features": 1}


def _config(stages):
    return merge(TINY, {"experiments": {"a": {"model": "fc", "stages": stages}}})


@pytest.mark.parametrize(
    "stages, expected",
    [
        (["xe"], {"train_xe_job": 1, "evaluate_job": 1, "export_model_job": 1}),
        (
            ["xe", "scst"],
            {"train_xe_job": 1, "prepro_cider_df": 1, "train_scst_job": 1, "evaluate_job": 2, "export_model_job": 1},
        ),
        (
            ["xe", "e2e"],
            {
                "train_xe_job": 1,
                "finetune_e2e_job": 1,
                "regenerate_features_job": 1,
                "evaluate_job": 2,
                "export_model_job": 1,
            },
        ),
        (
            ["xe", "e2e", "scst"],
            {
                "train_xe_job": 1,
                "finetune_e2e_job": 1,
                "regenerate_features_job": 1,
                "prepro_cider_df": 1,
                "train_scst_job": 1,
                "evaluate_job": 3,
                "export_model_job": 1,
            },
        ),
        (
            ["xe", "e2e", "scst", "scst_e2e"],
            {
                "train_xe_job": 1,
                "finetune_e2e_job": 1,
                "regenerate_features_job": 1,
                "prepro_cider_df": 1,
                "train_scst_job": 1,
                "train_scst_e2e_job": 1,
                "regenerate_scst_e2e_features_job": 1,
                "evaluate_job": 4,
                "export_model_job": 1,
            },
        ),
        (
            ["xe", "es"],
            {"train_xe_job": 1, "prepro_cider_df": 1, "train_es_job": 1, "evaluate_job": 2, "export_model_job": 1},
        ),
        (["es"], {"prepro_cider_df": 1, "train_es_job": 1, "evaluate_job": 1, "export_model_job": 1}),
    ],
)
def test_each_stage_list_is_a_valid_dag(tmp_path, stages, expected):
    workflow = Workflow(tmp_path / "wf", _config(stages))
    proc = workflow.run("-n")
    assert jobs(proc) == {
        **DATA,
        **expected,
        "report_metrics_job": 1,
        "plot_experiment_job": 1,
        "report_tables": 1,
        "all": 1,
    }


def test_scst_after_e2e_reads_regenerated_features_and_the_e2e_checkpoint(tmp_path):
    workflow = Workflow(tmp_path / "wf", _config(["xe", "e2e", "scst"]))
    proc = workflow.run("-n", "results/a/scst/model.pt")
    block = proc.stdout.split("rule train_scst_job:")[1].split("\n\n")[0]
    assert "results/a/features_e2e/train.h5" in block and "results/a/e2e/model.pt" in block
    assert "results/features/resnet18/train.h5" not in block
    proc = workflow.run("-n", "results/a/scst/model.pt", "--config", "experiments={a: {model: fc, stages: [xe, scst]}}")
    block = proc.stdout.split("rule train_scst_job:")[1].split("\n\n")[0]
    assert "results/features/resnet18/train.h5" in block and "results/a/xe/model.pt" in block


def test_an_unknown_stage_order_is_refused(tmp_path):
    workflow = Workflow(tmp_path / "wf", _config(["xe", "scst", "e2e"]))
    proc = workflow.run("-n", check=False)
    assert proc.returncode != 0
    assert "invalid config at experiments.a.stages: ['xe', 'scst', 'e2e'] is not one of" in proc.stdout + proc.stderr
