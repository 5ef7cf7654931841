"""Region features as the DAG's feature source: the bottom-up TSV import and the Faster R-CNN
extractor replace extract_features, and everything downstream reads their files."""

import json

import h5py
import numpy as np
import pytest

from captionflow.features.bottomup import write_bottomup_tsv
from tests.workflow.conftest import TINY, Workflow, jobs, merge

EXPERIMENT = {
    "a": {"model": "aoanet", "model_args": {"hidden_size": 32, "embed_size": 16, "n_heads": 2, "refiner_layers": 1}}
}


@pytest.mark.slow
def test_bottomup_tsv_import_feeds_the_dag(tmp_path):
    workflow = Workflow(tmp_path / "wf", TINY)
    workflow.run("prepro_labels")
    images = json.loads((workflow / "results/data/labels.json").read_text())["images"]
    rng = np.random.default_rng(0)
    rows = []
    for n, image in enumerate(images):
        k = (10, 36)[n % 2]
        boxes = np.sort(rng.uniform(0, 100, (k, 4)).astype(np.float32), axis=1)
        rows.append(
            {
                "image_id": image["id"],
                "image_w": 100,
                "image_h": 100,
                "boxes": boxes,
                "features": rng.standard_normal((k, 64)).astype(np.float32),
            }
        )
    write_bottomup_tsv(workflow / "trainval.tsv", rows)
    workflow.set_config(
        merge(
            TINY,
            {
                "features": {"backbone": "bottomup_tsv", "tsv": ["trainval.tsv"], "max_boxes": 36},
                "experiments": EXPERIMENT,
            },
        )
    )

    dry = jobs(workflow.run("-n"))
    assert dry["import_bottomup"] == 1 and "extract_features" not in dry and dry["train_xe_job"] == 1
    workflow.run("import_bottomup")
    with h5py.File(workflow / "results/features/bottomup_tsv/train.h5") as f:
        assert f["att"].shape[1:] == (36, 64) and f["att_mask"][()].sum(axis=1).tolist()[:2] in ([10, 36], [36, 10])

    # e2e fine-tunes a grid backbone: with region features it is refused in one line
    e2e = merge(EXPERIMENT, {"a": {"stages": ["xe", "e2e"]}})
    workflow.set_config(merge(workflow.config, {"experiments": e2e}))
    proc = workflow.run("-n", check=False)
    assert proc.returncode != 0
    assert (
        "invalid config at experiments.a.stages: e2e fine-tunes a grid backbone, and features.backbone is bottomup_tsv"
        in proc.stdout + proc.stderr
    )


def test_missing_tsv_and_faster_rcnn_source(tmp_path):
    workflow = Workflow(tmp_path / "wf", merge(TINY, {"features": {"backbone": "bottomup_tsv"}}))
    proc = workflow.run("-n", check=False)
    assert (
        proc.returncode != 0
        and "invalid config at features.tsv: backbone bottomup_tsv needs the TSV file(s)" in proc.stdout + proc.stderr
    )
    workflow.set_config(merge(TINY, {"features": {"backbone": "fasterrcnn_resnet50_fpn"}, "experiments": EXPERIMENT}))
    dry = jobs(workflow.run("-n"))
    assert dry["extract_regions"] == 1 and "extract_features" not in dry and dry["evaluate_job"] == 1
