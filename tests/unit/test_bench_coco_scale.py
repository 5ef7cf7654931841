"""bench/bench_coco_scale.py's generated data has COCO's shape (the benchmark itself runs
for an hour and is not part of the suite)."""

import importlib
from pathlib import Path

import pytest
from PIL import Image

from captionflow.data.karpathy import load_karpathy
from captionflow.data.resize import listed_sources

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_coco_scale.py"


@pytest.fixture
def bench(monkeypatch):
    """The script as a module importable by name (its image writers run in worker processes)."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    return importlib.import_module("bench_coco_scale")


def test_splits_are_karpathys_at_coco_size_and_scale_with_it(bench):
    assert bench.split_sizes(123_287) == {"test": 5000, "val": 5000, "restval": 30_504, "train": 82_783}
    small = bench.split_sizes(1000)
    assert sum(small.values()) == 1000 and small["test"] == small["val"] == 41


def test_generated_dataset_is_a_karpathy_file_with_readable_images(bench, tmp_path):
    captions, n_captions = bench.make_dataset(tmp_path, 60)
    records = load_karpathy(captions)
    assert len(records) == 60 and n_captions >= 300
    assert {r.split for r in records} == {"train", "restval", "val", "test"}
    assert all(len(r.captions) >= 5 for r in records)
    listed = listed_sources(captions)
    assert len(set(listed)) == 60 and all(p.startswith(("train2014/", "val2014/")) for p in listed)
    for rel in listed[:5]:
        with Image.open(tmp_path / "images" / rel) as img:
            assert img.size == (80, 60)
    config = bench.bench_config(tmp_path, captions)
    assert config["data"]["source"] == "karpathy" and config["experiments"]["sat"]["stages"] == ["xe", "scst"]
