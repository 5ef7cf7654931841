"""Person search through real Snakemake: `data.source: cuhk_pedes` imports a generated
reid_raw.json (the real field layout, several images per identity) into every data stage,
the identities reach evaluate_retrieval, and the retrieval model's backbone is fine-tuned
end to end after N steps; a hostile path in the annotation file stops in one line."""

import json

import pytest
import torch

from captionflow.data.cuhk_pedes import write_demo_reid_raw
from captionflow.features.backbones import create_backbone
from captionflow.models import checkpoint
from tests.workflow.conftest import TINY, Workflow, jobs, merge

RETRIEVAL = {
    "epochs": 2,
    "batch_size": 8,
    "model_args": {"embed_size": 16, "hidden_size": 16, "units": 16},
    "finetune_backbone_after": 4,
    "backbone_lr": 1e-3,
    "freeze_stages": 3,
}
CONFIG = merge(
    TINY,
    {
        "data": {"source": "cuhk_pedes", "cuhk_pedes_json": "pedes/reid_raw.json", "images_root": "pedes/imgs"},
        "labels": {"word_count_threshold": 1},
        "experiments": {
            "p": {
                "model": "fc",
                "model_args": {"embed_size": 16, "hidden_size": 16},
                "threads": 1,
                "retrieval": RETRIEVAL,
            }
        },
    },
)


def test_import_cuhk_pedes_is_a_target_of_its_source_and_no_rule_of_the_demo(tmp_path):
    workflow = Workflow(tmp_path / "wf", CONFIG)
    write_demo_reid_raw(workflow / "pedes/reid_raw.json", n_ids=6, images_per_id=2, images_root=workflow / "pedes/imgs")
    assert jobs(workflow.run("-n", "import_cuhk_pedes")) == {"import_cuhk_pedes": 1}
    assert jobs(workflow.run("-n", "prepro_labels")) == {"import_cuhk_pedes": 1, "resize_images": 1, "prepro_labels": 1}
    demo = Workflow(tmp_path / "demo", TINY)
    assert demo.run("-n", "import_cuhk_pedes", check=False).returncode != 0


@pytest.mark.slow
def test_cuhk_pedes_source_serves_identity_aware_end_to_end_retrieval(tmp_path):
    workflow = Workflow(tmp_path / "wf", CONFIG)
    raw = write_demo_reid_raw(
        workflow / "pedes/reid_raw.json", n_ids=12, images_per_id=3, seed=1, images_root=workflow / "pedes/imgs"
    )
    records = json.loads(raw.read_text())
    proc = workflow.run("evaluate_retrieval")
    counts = jobs(proc)
    assert counts["import_cuhk_pedes"] == 1 and counts["resize_images"] == 1 and counts["train_retrieval_job"] == 1
    assert "make_demo_dataset" not in counts

    # the identities survive import and prepro_labels, image for image
    index = json.loads((workflow / "results/data/labels.json").read_text())
    by_path = {r["file_path"]: r["id"] for r in records}
    assert len(index["images"]) == len(records)
    assert all(img["person_id"] == by_path[img["file_path"]] for img in index["images"])

    # evaluated as person search: 2 test identities of 3 images each
    metrics = json.loads((workflow / "results/p/test/retrieval/metrics.json").read_text())
    assert metrics["person_search"] and metrics["end_to_end"]
    assert (metrics["images"], metrics["identities"], metrics["captions"]) == (6, 2, 12)
    # with 2 identities every caption has a match in its 2 best: identity-aware R@5 is 100
    assert metrics["text_to_image"]["R@5"] == 100.0

    # the backbone trained after step 4 (its last stage moved; the frozen stem did not)
    ckpt = checkpoint.load(workflow / "results/p/retrieval/model.pt")
    initial = create_backbone("resnet18", "none", 0, 64).state_dict()
    moved = {k for k, v in ckpt["backbone"].items() if v.is_floating_point() and not torch.equal(v, initial[k])}
    assert any(k.startswith("trunk.7.") for k in moved) and not any(k.startswith("trunk.0.") for k in moved)

    # a record naming a file outside the images folder: one line, nothing imported
    records[0]["file_path"] = "../../etc/passwd"
    raw.write_text(json.dumps(records))
    failed = workflow.run("evaluate_retrieval", check=False)
    assert failed.returncode != 0
    log = (workflow / "logs/import_cuhk_pedes.log").read_text().strip()
    assert len(log.splitlines()) == 1 and "'../../etc/passwd'" in log and "inside the images folder" in log
    assert "Traceback" not in log
