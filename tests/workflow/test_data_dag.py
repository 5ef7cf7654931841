"""The data half of the DAG through real Snakemake: build, no-op, targets, config changes, errors."""

import json
import os

import h5py
import numpy as np
import pytest

from captionflow.data.demo import make_demo_dataset
from tests.workflow.conftest import TINY, jobs, merge

DATA_JOBS = {"make_demo_dataset", "resize_images", "prepro_labels", "extract_features"}
FEATURES = [f"results/features/resnet18/{s}.h5" for s in ("train", "val", "test")]


def _read(path):
    with h5py.File(path) as f:
        return {k: f[k][()] for k in f}


@pytest.mark.slow
def test_build_then_noop_then_config_change(workflow):
    first = workflow.run()
    assert set(jobs(first)) == DATA_JOBS | {"all"}
    index = json.loads((workflow / "results/data/labels.json").read_text())
    with h5py.File(workflow / "results/data/labels.h5") as f:
        assert f["label_start_ix"].shape == (len(index["images"]),)
    for path in FEATURES:
        split = path.split("/")[-1][:-3]
        arrays = _read(workflow / path)
        assert arrays["image_id"].tolist() == [i["id"] for i in index["images"] if i["split"] == split]
        assert arrays["att"].dtype == np.float32
    manifest_mtime = os.stat(workflow / "results/data/resize_manifest.json").st_mtime_ns

    again = workflow.run()
    assert jobs(again) == {}
    assert "Nothing to be done" in again.stderr

    workflow.set_config(merge(TINY, {"features": {"dtype": "float16"}}))
    changed = workflow.run()
    assert set(jobs(changed)) == {"extract_features", "all"}
    assert _read(workflow / FEATURES[0])["att"].dtype == np.float16
    assert os.stat(workflow / "results/data/resize_manifest.json").st_mtime_ns == manifest_mtime


def test_a_stage_by_rule_name_schedules_only_what_it_needs(workflow):
    assert set(jobs(workflow.run("-n", "resize_images"))) == {"make_demo_dataset", "resize_images"}
    assert set(jobs(workflow.run("-n", "prepro_labels"))) == {"make_demo_dataset", "resize_images", "prepro_labels"}


@pytest.mark.slow
def test_extract_features_target_builds_that_stage(workflow):
    proc = workflow.run("extract_features")
    assert set(jobs(proc)) == DATA_JOBS
    assert all((workflow / p).exists() for p in FEATURES)


@pytest.mark.parametrize(
    "override, key",
    [
        ({"resize": {"sise": 3}}, "invalid config at resize.sise: unknown key"),
        ({"features": {"dtype": "float8"}}, "invalid config at features.dtype: 'float8' is not one of"),
        ({"labels": {"max_len": "ten"}}, "invalid config at labels.max_len: 'ten' is not of type 'integer'"),
        ({"featurs": {}}, "invalid config at featurs: unknown key"),
        # renamed keys name their new name
        (
            {"labels": {"max_length": 16}},
            "invalid config at labels.max_length: labels.max_length was renamed: write labels.max_len",
        ),
        (
            {"experiments": {"x": {"model": "fc", "e2e": {"amp": "bf16"}}}},
            "invalid config at experiments.x.e2e.amp: e2e.amp was renamed: write e2e.precision",
        ),
        (
            {"features": {"att_size": 7}},
            "invalid config at features.att_size: features.att_size was renamed: write features.grid_size",
        ),
    ],
)
def test_invalid_config_fails_before_any_job_naming_the_key(workflow, override, key):
    workflow.set_config(merge(TINY, override))
    proc = workflow.run(check=False)
    assert proc.returncode != 0
    assert key in proc.stderr
    assert jobs(proc) == {}
    assert not (workflow / "results").exists()


def _external_dataset(workflow, corrupt=None):
    """A Karpathy-style dataset outside the demo source, optionally with one corrupt image."""
    root = workflow / "coco"
    make_demo_dataset(
        root / "dataset_coco.json",
        root / "images",
        {"train": 16, "val": 4, "test": 4},
        seed=7,
        min_side=64,
        max_side=80,
    )
    if corrupt is not None:
        (root / "images" / f"demo_{corrupt:06d}.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return merge(
        TINY, {"data": {"source": "karpathy", "karpathy_json": "coco/dataset_coco.json", "images_root": "coco"}}
    )


def test_real_dataset_paths_and_bad_image_fail(workflow):
    workflow.set_config(_external_dataset(workflow, corrupt=3))
    proc = workflow.run("prepro_labels", check=False)
    assert proc.returncode != 0
    assert "make_demo_dataset" not in jobs(proc)
    assert "error: bad image coco/images/demo_000003.jpg (id 4): cannot decode" in proc.stderr
    assert not (workflow / "results/data/resize_manifest.json").exists()
    assert not (workflow / "results/data/labels.json").exists()


@pytest.mark.slow
def test_bad_image_skip_drops_it_from_every_stage(workflow):
    config = _external_dataset(workflow, corrupt=3)
    workflow.set_config(merge(config, {"resize": {"on_bad_image": "skip"}}))
    workflow.run()
    skipped = (workflow / "results/data/resize_skipped.tsv").read_text().splitlines()
    assert skipped[0] == "id\tfile\treason" and skipped[1].startswith("4\tcoco/images/demo_000003.jpg\t")
    ids = [img["id"] for img in json.loads((workflow / "results/data/labels.json").read_text())["images"]]
    assert 4 not in ids and len(ids) == 23
    assert 4 not in _read(workflow / FEATURES[0])["image_id"]


def test_caption_file_in_wrong_shape(workflow):
    config = _external_dataset(workflow)
    data = json.loads((workflow / "coco/dataset_coco.json").read_text())
    data["images"][5]["sentences"] = []
    (workflow / "coco/dataset_coco.json").write_text(json.dumps(data))
    workflow.set_config(config)
    proc = workflow.run(check=False)
    assert proc.returncode != 0
    assert (
        "error: captions file coco/dataset_coco.json: images[5] (id 6, demo_000005.jpg) has no sentences" in proc.stderr
    )
    assert not (workflow / "results/data").exists() or not any((workflow / "results/data").glob("*.json"))


@pytest.mark.slow
def test_extract_features_sigkill_resumes_to_identical_hdf5(workflow):
    # Enough work per chunk that the kill lands mid-extraction.
    workflow.set_config(merge(TINY, {"resize": {"size": 96}, "features": {"backbone": "resnet50", "batch_size": 2}}))
    workflow.run("prepro_labels")
    out = workflow / "results/features/resnet50/train.h5"
    progress = out.with_name("train.h5.partial.json")
    killed = workflow.run_until(progress, "extract_features")
    assert killed, "extraction finished or failed before the first chunk completed"
    done = json.loads(progress.read_text())["rows_done"]
    assert 0 < done < 28 and not out.exists()

    workflow.run("extract_features")
    log = (workflow / "logs/extract_features.log").read_text()
    assert f"resuming train.h5 at row {done} of 28" in log
    resumed = {s: _read(workflow / f"results/features/resnet50/{s}.h5") for s in ("train", "val", "test")}

    workflow.run("extract_features", "--forcerun", "extract_features")
    assert "resuming" not in (workflow / "logs/extract_features.log").read_text()
    for split, arrays in resumed.items():
        fresh = _read(workflow / f"results/features/resnet50/{split}.h5")
        assert arrays.keys() == fresh.keys()
        assert all(np.array_equal(arrays[k], fresh[k]) for k in fresh)
