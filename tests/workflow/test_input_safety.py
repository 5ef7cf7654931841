"""Hostile and malformed inputs through real Snakemake: image paths stay inside the images
root, copies are unique per source and redone when their source changes (even to an older
mtime), decompression bombs are bad images, data problems are visible on the console."""

import json
import os
import struct
import zlib

import h5py
import numpy as np
import pytest
from PIL import Image

from captionflow.data.demo import make_demo_dataset
from tests.workflow.conftest import TINY, Workflow, jobs, merge

FEATURES = "results/features/resnet18/train.h5"


def _noise(path, seed, side=72):
    """A random RGB image (distinct per seed, so its features are distinct too)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _png_header_only(path, width, height):
    """A PNG whose header declares width x height pixels, with almost no pixel data."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def _files(folder):
    """Every file below `folder` -> (bytes, mtime_ns)."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def photos(tmp_path):
    """The user's own Karpathy-schema dataset, outside the working directory."""
    root = tmp_path / "photos"
    make_demo_dataset(
        root / "dataset_coco.json",
        root / "images",
        {"train": 16, "val": 4, "test": 4},
        seed=7,
        min_side=64,
        max_side=80,
    )
    return root


def _edit(captions, **images):
    """Set (filepath, filename) of images[i] for each `i<index>=(filepath, filename)`."""
    data = json.loads(captions.read_text())
    for key, (filepath, filename) in images.items():
        data["images"][int(key[1:])].update(filepath=filepath, filename=filename)
    captions.write_text(json.dumps(data))


def _workflow(tmp_path, **over):
    config = merge(
        TINY,
        {"data": {"source": "karpathy", "karpathy_json": "../photos/dataset_coco.json", "images_root": "../photos"}},
    )
    return Workflow(tmp_path / "wf", merge(config, over))


def _manifest_files(workflow):
    manifest = json.loads((workflow / "results/data/resize_manifest.json").read_text())
    return {img["id"]: workflow / manifest["image_dir"] / img["file_path"] for img in manifest["images"]}


def _features(workflow):
    with h5py.File(workflow / FEATURES) as f:
        return dict(zip(f["image_id"][()].tolist(), f["att"][()]))


def _escaping_captions(tmp_path, photos):
    """A user's folder beside the images root, and a caption file whose images[2] climbs
    out into it with ../ and whose images[4] names it by absolute path (the old code wrote
    that copy to the absolute path with .jpg: over private/cat.jpg)."""
    private = tmp_path / "private"
    private.mkdir()
    _noise(private / "cat.png", seed=1)
    (private / "cat.jpg").write_bytes(b"the user's own file, beside the source image")
    _edit(photos / "dataset_coco.json", i2=("images/../..", "private/cat.png"), i4=("", str(private / "cat.png")))
    return private


def test_paths_outside_the_images_root_are_refused_and_nothing_outside_is_touched(tmp_path, photos):
    _escaping_captions(tmp_path, photos)
    workflow = _workflow(tmp_path)
    outside = {p: v for p, v in _files(tmp_path).items() if workflow.path not in p.parents}

    proc = workflow.run("prepro_labels", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: captions file ../photos/dataset_coco.json: images[2] (id 3, file images/../../private/cat.png) "
        "is outside data.images_root ../photos (and 1 more); fix its filepath/filename, or set "
        "data.allow_outside_root: true to read images from outside the root"
    ]
    assert "Traceback" not in out
    assert not (workflow / "results/data/resize_manifest.json").exists()
    assert not (workflow / "results/data/resized").exists()
    after = {p: v for p, v in _files(tmp_path).items() if workflow.path not in p.parents}
    assert after == outside  # every file outside the working directory: same bytes, same mtime


def test_outside_paths_when_allowed_are_read_not_written(tmp_path, photos):
    _escaping_captions(tmp_path, photos)
    workflow = _workflow(tmp_path, data={"allow_outside_root": True})
    outside = {p: v for p, v in _files(tmp_path).items() if workflow.path not in p.parents}

    workflow.run("resize_images")
    copies = _manifest_files(workflow)
    assert len(copies) == 24 and all(workflow.path / "results" in p.parents for p in copies.values())
    assert {p: v for p, v in _files(tmp_path).items() if workflow.path not in p.parents} == outside


def test_same_stem_copies_are_distinct_and_a_replaced_image_reruns_resize_and_features(tmp_path, photos):
    images = photos / "images"
    _noise(images / "x.png", seed=1)
    _noise(images / "x.jpg", seed=2)
    _edit(photos / "dataset_coco.json", i0=("images", "x.png"), i1=("images", "x.jpg"))  # ids 1 and 2
    workflow = _workflow(tmp_path)

    workflow.run("extract_features")
    copies = _manifest_files(workflow)
    assert copies[1] != copies[2] and copies[1].read_bytes() != copies[2].read_bytes()
    features = _features(workflow)
    assert not np.allclose(features[1], features[2])

    # A second run does nothing: the listed images are fingerprinted, not the run.
    assert jobs(workflow.run("extract_features")) == {}

    # Another image under an existing name, with an mtime older than the resized copy's.
    replaced = images / "demo_000005.jpg"  # id 6, train
    stamps = {i: p.stat().st_mtime_ns for i, p in copies.items()}
    old_copy = copies[6].read_bytes()
    before = replaced.stat().st_mtime_ns - 3600 * 10**9
    _noise(replaced, seed=3, side=80)
    os.utime(replaced, ns=(before, before))
    proc = workflow.run("extract_features")
    assert {"resize_images", "extract_features"} <= set(jobs(proc))
    assert copies[6].read_bytes() != old_copy
    assert all(copies[i].stat().st_mtime_ns == t for i, t in stamps.items() if i != 6)  # only it was redone
    new_features = _features(workflow)
    assert not np.allclose(new_features[6], features[6])
    assert all(np.array_equal(new_features[i], features[i]) for i in features if i != 6)


def test_decompression_bomb_fails_in_one_line_or_is_skipped(tmp_path, photos):
    _png_header_only(photos / "images" / "bomb.png", 30000, 30000)  # 900 M pixels declared
    _edit(photos / "dataset_coco.json", i3=("images", "bomb.png"))  # id 4, train
    workflow = _workflow(tmp_path)

    proc = workflow.run("prepro_labels", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: bad image ../photos/images/bomb.png (id 4): 30000 x 30000 = 900000000 pixels, over "
        "resize.max_pixels 100000000 (a decompression bomb, or raise resize.max_pixels) "
        "(set resize.on_bad_image: skip to drop it from every split)"
    ]
    assert "Traceback" not in out and "DecompressionBomb" not in out
    assert not (workflow / "results/data/resize_manifest.json").exists()

    # skip drops it; a vocabulary this small is said on the console, naming the key
    workflow.set_config(
        merge(workflow.config, {"resize": {"on_bad_image": "skip"}, "labels": {"word_count_threshold": 40}})
    )
    proc = workflow.run("prepro_labels")
    skipped = (workflow / "results/data/resize_skipped.tsv").read_text().splitlines()
    assert skipped[1].startswith("4\t../photos/images/bomb.png\t30000 x 30000 = 900000000 pixels")
    assert len(skipped) == 2
    ids = [img["id"] for img in json.loads((workflow / "results/data/labels.json").read_text())["images"]]
    assert 4 not in ids and len(ids) == 23
    warning = next(line for line in proc.stderr.splitlines() if "degenerate vocabulary" in line)
    assert (
        warning.startswith("prepro_labels: warning: degenerate vocabulary")
        and "labels.word_count_threshold (now 40" in warning
    )
