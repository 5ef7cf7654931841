"""Every stage of the stage table (docs/stages.md) by its name: built as a target (exactly
that stage and what it needs), rerun with -R, regenerated per experiment."""

import copy
import re

import pytest

from tests.workflow.conftest import REPO, TINY, Workflow, jobs, merge

# its longest tests took 121 s in a make test run sharing its 2 cores with a demo
pytestmark = pytest.mark.timeout(450)

FC = {
    "model": "fc",
    "model_args": {"embed_size": 16, "hidden_size": 32},
    "threads": 1,
    "xe": {"epochs": 1, "batch_size": 8},
}
# a: XE, e2e, SCST, SCST end to end; b: XE then SCST; c: XE only (an attention model: its
# attention maps); d: XE then ES, and a retrieval model
THREE = merge(
    TINY,
    {
        "experiments": {
            "a": {**FC, "stages": ["xe", "e2e", "scst", "scst_e2e"], "e2e": {"epochs": 1, "batch_size": 8}},
            "b": {**FC, "stages": ["xe", "scst"]},
            "c": {
                **FC,
                "model": "show_attend_tell",
                "model_args": {"embed_size": 16, "hidden_size": 32, "att_size": 16},
            },
            "d": {**FC, "stages": ["xe", "es"], "es": {"iterations": 1, "offspring": 2}, "retrieval": {"epochs": 1}},
        }
    },
)

DEMO = {"make_demo_dataset": 1}
RESIZE = {**DEMO, "resize_images": 1}
LABELS = {**RESIZE, "prepro_labels": 1}
DATA = {**LABELS, "extract_features": 1}
XE = {**DATA, "train_xe_job": 4}
E2E = {**DATA, "train_xe_job": 1, "finetune_e2e_job": 1}
REGEN = {**E2E, "regenerate_features_job": 1}
SCST = {**REGEN, "train_xe_job": 2, "prepro_cider_df": 1, "train_scst_job": 2}
SCST_E2E = {**REGEN, "prepro_cider_df": 1, "train_scst_job": 1, "train_scst_e2e_job": 1}  # a's only
ES = {**DATA, "train_xe_job": 1, "prepro_cider_df": 1, "train_es_job": 1}
EVAL = {
    **SCST,
    **SCST_E2E,
    **ES,
    "train_xe_job": 4,
    "train_scst_job": 2,
    "regenerate_scst_e2e_features_job": 1,
    "evaluate_job": 4 + 2 + 1 + 2,
}
# what `snakemake <stage>` schedules for THREE: the stage's jobs, what they need, and the
# stage target itself where the stage runs per experiment
EXPECTED = {
    "make_demo_dataset": DEMO,
    "resize_images": RESIZE,
    "prepro_labels": LABELS,
    "extract_features": DATA,
    "prepro_cider_df": {**LABELS, "prepro_cider_df": 1},
    "train_xe": {**XE, "train_xe": 1},
    "finetune_e2e": {**E2E, "finetune_e2e": 1},
    "regenerate_features": {**SCST_E2E, "regenerate_scst_e2e_features_job": 1, "regenerate_features": 1},
    "train_scst": {**SCST, "train_scst": 1},
    "train_scst_e2e": {**SCST_E2E, "train_scst_e2e": 1},
    "train_es": {**ES, "train_es": 1},
    "train_retrieval": {**DATA, "train_retrieval_job": 1, "train_retrieval": 1},
    "evaluate_retrieval": {**DATA, "train_retrieval_job": 1, "evaluate_retrieval_job": 1, "evaluate_retrieval": 1},
    "evaluate": {**EVAL, "evaluate": 1},
    "report_metrics": {**EVAL, "report_metrics_job": 4, "report_metrics": 1},
    "export_model": {**EVAL, "report_metrics_job": 4, "export_model_job": 4, "export_model": 1},
    "plot_experiment": {**EVAL, "plot_experiment_job": 4, "plot_experiment": 1},
    "plot_attention": {**DATA, "train_xe_job": 1, "plot_attention_job": 1, "plot_attention": 1},
    "report_tables": {
        **EVAL,
        "report_metrics_job": 4,
        "export_model_job": 4,
        "train_retrieval_job": 1,
        "evaluate_retrieval_job": 1,
        "plot_experiment_job": 4,
        "plot_attention_job": 1,
        "report_tables": 1,
    },
    "export_onnx": {**EVAL, "report_metrics_job": 4, "export_model_job": 4, "export_onnx_job": 4, "export_onnx": 1},
}


def documented_stages():
    """The stage names of the stage table in docs/stages.md (first column), in order."""
    text = (REPO / "docs/stages.md").read_text()
    table = text.split("| stage", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^\| `(\w+)`", table, re.M)


def test_the_stage_table_lists_every_stage_of_the_dag():
    stages = documented_stages()
    assert [s for s in stages if s != "prefetch"] == list(EXPECTED)


@pytest.mark.parametrize("stage", list(EXPECTED))
def test_each_stage_name_is_a_target_that_builds_exactly_that_stage(tmp_path, stage):
    workflow = Workflow(tmp_path / "wf", THREE)
    assert jobs(workflow.run("-n", stage)) == EXPECTED[stage]


def test_one_experiments_stage_by_its_output_file(tmp_path):
    workflow = Workflow(tmp_path / "wf", THREE)
    proc = workflow.run("-n", "results/b/scst/model.pt")
    assert jobs(proc) == {**DATA, "train_xe_job": 1, "prepro_cider_df": 1, "train_scst_job": 1}
    assert "experiment=b" in proc.stdout and "experiment=a" not in proc.stdout


def test_a_stage_no_experiment_has_says_so(tmp_path):
    workflow = Workflow(tmp_path / "wf", merge(TINY, {"experiments": {"c": FC}}))
    proc = workflow.run("-n", "train_scst", check=False)
    assert proc.returncode != 0
    assert "nothing to build for train_scst: no experiment in the config has that stage" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_train_xe_really_runs_alone_and_a_forced_rerun_by_name_retrains_only_it(tmp_path):
    workflow = Workflow(tmp_path / "wf", THREE)
    assert jobs(workflow.run("train_xe")) == EXPECTED["train_xe"]
    for name in "abcd":
        assert (workflow / f"results/{name}/xe/model.pt").exists()
        assert not (workflow / f"results/{name}/xe/state").exists()  # a finished stage leaves no state
    assert not (workflow / "results/a/e2e").exists() and not (workflow / "results/a/test").exists()
    assert jobs(workflow.run("train_xe")) == {}  # done is done

    # -R with the stage's name retrains every experiment's XE and, with --until, nothing after it
    proc = workflow.run("-R", "train_xe", "--until", "train_xe")
    assert jobs(proc) == {"train_xe_job": 4, "train_xe": 1}
    proc = workflow.run("-n", "-R", "train_xe_job", "--until", "train_xe")  # the job rule's own name too
    assert jobs(proc) == {"train_xe_job": 4, "train_xe": 1}


@pytest.mark.slow
def test_changing_one_e2e_experiment_regenerates_its_features_only(tmp_path):
    e2e = {"stages": ["xe", "e2e"], "e2e": {"epochs": 1, "batch_size": 8}}
    config = merge(TINY, {"experiments": {e: copy.deepcopy({**FC, **e2e}) for e in "ab"}})
    workflow = Workflow(tmp_path / "wf", config)
    assert jobs(workflow.run("regenerate_features"))["regenerate_features_job"] == 2
    before = {e: (workflow / f"results/{e}/features_e2e/test.h5").stat().st_mtime_ns for e in "ab"}

    config["experiments"]["b"]["e2e"]["lr"] = 3e-4
    workflow.set_config(config)
    proc = workflow.run("regenerate_features")
    assert jobs(proc) == {"finetune_e2e_job": 1, "regenerate_features_job": 1, "regenerate_features": 1}
    block = (proc.stdout + proc.stderr).split("rule regenerate_features_job:")[1].split("\n\n")[0]
    assert "experiment=b" in block and "results/b/e2e/backbone.pth" in block
    after = {e: (workflow / f"results/{e}/features_e2e/test.h5").stat().st_mtime_ns for e in "ab"}
    assert after["a"] == before["a"] and after["b"] != before["b"]
