"""Retrieval-only experiments through real Snakemake: an experiment with `retrieval:` and no
`model:` plans the data stages, the features, train_retrieval and evaluate_retrieval and no
captioner job; beside a captioning experiment each gets its own jobs; the configs that
cannot mean one are refused in one line; one runs end to end on the tiny demo into the
report's retrieval table and the run summary."""

import json

import pytest

from captionflow.data.cuhk_pedes import write_demo_reid_raw
from tests.workflow.conftest import TINY, Workflow, jobs, merge

pytestmark = pytest.mark.timeout(300)

RETRIEVAL = {"epochs": 1, "batch_size": 8, "model_args": {"embed_size": 16, "hidden_size": 16, "units": 16}}
ONLY = merge(TINY, {"experiments": {"r": {"threads": 1, "retrieval": RETRIEVAL}}})
CAPTIONER = {"model": "fc", "model_args": {"embed_size": 16, "hidden_size": 16}, "threads": 1}
MIXED = merge(TINY, {"experiments": {"c": CAPTIONER, "r": {"threads": 1, "retrieval": RETRIEVAL}}})

# what a retrieval-only run builds: the data stages, the grid features, the retrieval model
# and its test metrics, the report's tables page
DATA = {"resize_images": 1, "prepro_labels": 1, "extract_features": 1}
RETRIEVAL_JOBS = {"train_retrieval_job": 1, "evaluate_retrieval_job": 1, "report_tables": 1, "all": 1}


def test_a_retrieval_only_experiment_plans_no_captioner_job(tmp_path):
    workflow = Workflow(tmp_path / "wf", ONLY)
    proc = workflow.run("-n")
    assert jobs(proc) == {"make_demo_dataset": 1, **DATA, **RETRIEVAL_JOBS}
    assert "results/r/xe/" not in proc.stdout and "prepro_cider_df" not in proc.stdout
    # a captioning stage target has nothing to build
    proc = workflow.run("-n", "train_xe", check=False)
    assert proc.returncode != 0 and "nothing to build for train_xe" in proc.stdout + proc.stderr


def test_a_retrieval_only_experiment_that_finetunes_its_backbone_reads_the_images(tmp_path):
    config = merge(ONLY, {"experiments": {"r": {"retrieval": {**RETRIEVAL, "finetune_backbone_after": 0}}}})
    proc = Workflow(tmp_path / "wf", config).run("-n", "train_retrieval")
    assert jobs(proc) == {"make_demo_dataset": 1, **DATA, "train_retrieval_job": 1, "train_retrieval": 1}
    train = proc.stdout[proc.stdout.index("rule train_retrieval_job:") :].split("\n\n")[0]
    assert "results/data/resize_manifest.json" in train


def test_beside_a_captioning_experiment_each_plans_its_own_jobs_and_the_captioner_may_rerank_with_it(tmp_path):
    config = merge(MIXED, {"experiments": {"c": {"evaluate": {"rerank_k": 2, "rerank_model": "r"}}}})
    proc = Workflow(tmp_path / "wf", config).run("-n")
    captioner = {"train_xe_job", "evaluate_job", "report_metrics_job", "export_model_job", "plot_experiment_job"}
    counts = jobs(proc)
    assert {rule: counts[rule] for rule in captioner} == dict.fromkeys(captioner, 1)
    assert counts["train_retrieval_job"] == 1 and counts["evaluate_retrieval_job"] == 1
    out = proc.stdout
    assert "results/c/xe/model.pt" in out and "results/r/retrieval/model.pt" in out
    assert "results/r/xe/" not in out and "results/r/export/" not in out and "results/r/report/" not in out
    assert "results/c/retrieval/" not in out
    # c's beams are reranked with r's retrieval model: evaluate_job reads it
    evaluate = out[out.index("rule evaluate_job:") :].split("\n\n")[0]
    assert "results/r/retrieval/model.pt" in evaluate


def test_cuhk_pedes_with_only_a_retrieval_experiment_plans_labels_but_no_cider_df(tmp_path):
    config = merge(
        ONLY,
        {
            "data": {"source": "cuhk_pedes", "cuhk_pedes_json": "pedes/reid_raw.json", "images_root": "pedes/imgs"},
            "labels": {"word_count_threshold": 1},
        },
    )
    workflow = Workflow(tmp_path / "wf", config)
    write_demo_reid_raw(workflow / "pedes/reid_raw.json", n_ids=4, images_per_id=2, images_root=workflow / "pedes/imgs")
    assert jobs(workflow.run("-n")) == {"import_cuhk_pedes": 1, **DATA, **RETRIEVAL_JOBS}


@pytest.mark.parametrize(
    ("config", "line"),
    [
        (
            merge(ONLY, {"experiments": {"n": {"threads": 1}}}),
            "invalid config at experiments.n: give `model:` (a captioner) or `retrieval:` (a retrieval-only experiment)",
        ),
        (  # a captioner key without model: still the missing model or retrieval
            merge(TINY, {"experiments": {"n": {"stages": ["xe"]}}}),
            "invalid config at experiments.n: give `model:` (a captioner) or `retrieval:` (a retrieval-only experiment)",
        ),
        (
            merge(ONLY, {"experiments": {"r": {"stages": ["xe"]}}}),
            "invalid config at experiments.r.stages: a retrieval-only experiment (`retrieval:` and no `model:`) "
            "trains no captioner; remove this key or give `model:`",
        ),
        (
            merge(MIXED, {"ensembles": {"e": {"members": ["c", "r"]}}}),
            "invalid config at ensembles.e.members: 'r' is a retrieval-only experiment (no `model:`), it has no "
            "captioner to decode with; name experiments that train one (c)",
        ),
    ],
    ids=["neither", "stages_without_either", "stages", "ensemble_member"],
)
def test_configs_that_are_no_retrieval_only_experiment_are_refused_in_one_line(tmp_path, config, line):
    proc = Workflow(tmp_path / "wf", config).run("-n", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and out.count(line) == 1 and "Traceback" not in out
    assert not jobs(proc)


def test_a_retrieval_only_run_ends_in_its_metrics_the_report_table_and_the_summary(tmp_path):
    workflow = Workflow(tmp_path / "wf", ONLY)
    proc = workflow.run()
    assert jobs(proc) == {"make_demo_dataset": 1, **DATA, **RETRIEVAL_JOBS}
    metrics = json.loads((workflow / "results/r/test/retrieval/metrics.json").read_text())
    t2i = metrics["text_to_image"]
    # the summary prints the file's figures, one decimal
    line = f"r retrieval (gna_rnn, test): text-to-image R@1 {t2i['R@1']:.1f} R@5 {t2i['R@5']:.1f}"
    assert line in proc.stderr
    assert "not evaluated yet" not in proc.stderr and "Caption your own images" not in proc.stderr
    # the report's page: its retrieval table has r's row; no captioner's files anywhere
    page = (workflow / "results/report/metrics.html").read_text()
    assert "<h2>Retrieval: every retrieval model" in page and "<td class='text'>r</td>" in page
    assert sorted(p.name for p in (workflow / "results/r").iterdir()) == ["retrieval", "test"]
