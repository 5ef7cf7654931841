"""Region features: bottom-up TSV import (round trip, errors, resume) and the Faster R-CNN extractor."""

import json
import urllib.error

import h5py
import numpy as np
import pytest
import torch
import torchvision

from captionflow.config import build
from captionflow.errors import CaptionflowError
from captionflow.features import bottomup, regions
from captionflow.features.bottomup import import_bottomup, write_bottomup_tsv
from captionflow.features.regions import RegionConfig, create_detector, extract_regions

SPLITS = ("train", "val", "test")
DIM = 16  # the release has 2048; the format does not care


class _Crash(Exception):
    pass


@pytest.fixture(scope="module")
def data(tiny_data):
    return tiny_data


@pytest.fixture(scope="module")
def split_ids(data):
    images = json.loads((data / "labels.json").read_text())["images"]
    return {s: [img["id"] for img in images if img["split"] == s] for s in SPLITS}


def _rows(ids, seed=0):
    """TSV rows of `ids` with 10, 36 and 100 boxes in turn, in a shuffled order."""
    rng = np.random.default_rng(seed)
    rows = []
    for n, image_id in enumerate(ids):
        k = (10, 36, 100)[n % 3]
        w, h = int(rng.integers(50, 640)), int(rng.integers(50, 640))
        xy1 = rng.uniform(0, 1, (k, 2)) * [w, h]
        xy2 = xy1 + rng.uniform(0, 1, (k, 2)) * ([w, h] - xy1)
        boxes = np.concatenate([xy1, xy2], axis=1).astype(np.float32)
        feats = rng.standard_normal((k, DIM)).astype(np.float32)
        rows.append({"image_id": image_id, "image_w": w, "image_h": h, "boxes": boxes, "features": feats})
    return [rows[i] for i in rng.permutation(len(rows))]


def _all_ids(split_ids):
    return [i for s in SPLITS for i in split_ids[s]]


def _write_shards(tmp_path, rows, shards=2):
    paths = []
    for s, part in enumerate(np.array_split(np.arange(len(rows)), shards)):
        paths.append(tmp_path / f"trainval.tsv.{s}")
        write_bottomup_tsv(paths[-1], [rows[i] for i in part])
    return paths


def _outputs(out_dir, splits=SPLITS):
    return {s: out_dir / f"{s}.h5" for s in splits}


def _read(path):
    with h5py.File(path) as f:
        return {k: f[k][()] for k in f}, dict(f.attrs)


def test_tsv_import_round_trips_exactly(data, split_ids, tmp_path):
    # Images the labels do not list (like the COCO TSV's other images) are skipped.
    rows = _rows(_all_ids(split_ids) + [10**9 + 1, 10**9 + 2])
    tsvs = _write_shards(tmp_path, rows)
    assert tsvs[0].read_bytes().count(b"\r\n") == len(np.array_split(np.arange(len(rows)), 2)[0])
    outputs = _outputs(tmp_path / "feats")
    import_bottomup(tsvs, data / "labels.json", outputs, max_boxes=100)
    by_id = {r["image_id"]: r for r in rows}
    for split, path in outputs.items():
        arrays, attrs = _read(path)
        assert set(arrays) == {"att", "att_mask", "fc", "boxes", "num_boxes", "image_id"}
        assert arrays["image_id"].tolist() == split_ids[split]
        n = len(split_ids[split])
        assert arrays["att"].shape == (n, 100, DIM) and arrays["att"].dtype == np.float32
        assert arrays["boxes"].shape == (n, 100, 4) and arrays["att_mask"].dtype == np.bool_
        for r, image_id in enumerate(split_ids[split]):
            row = by_id[image_id]
            k = len(row["boxes"])
            scale = np.array([row["image_w"], row["image_h"]] * 2, dtype=np.float32)
            assert arrays["num_boxes"][r] == k
            assert arrays["att_mask"][r].tolist() == [True] * k + [False] * (100 - k)
            np.testing.assert_array_equal(arrays["att"][r, :k], row["features"])
            np.testing.assert_array_equal(arrays["boxes"][r, :k], np.clip(row["boxes"] / scale, 0, 1))
            assert not arrays["att"][r, k:].any() and not arrays["boxes"][r, k:].any()
            np.testing.assert_allclose(arrays["fc"][r], row["features"].mean(axis=0), rtol=1e-6, atol=1e-7)
        assert 0 <= arrays["boxes"].min() and arrays["boxes"].max() <= 1
        assert attrs["feat_dim"] == DIM and attrs["max_boxes"] == 100 and attrs["max_num_boxes"] == 100
    assert not list(tmp_path.rglob("*.partial*"))


def test_float16_and_one_split(data, split_ids, tmp_path):
    rows = _rows(_all_ids(split_ids))
    tsv = tmp_path / "all.tsv"
    write_bottomup_tsv(tsv, rows)
    out = _outputs(tmp_path, ["val"])
    import_bottomup(tsv, data / "labels.json", out, max_boxes=100, dtype="float16")
    arrays, _ = _read(out["val"])
    assert arrays["att"].dtype == np.float16 and arrays["fc"].dtype == np.float16
    by_id = {r["image_id"]: r for r in rows}
    expected = np.stack([by_id[i]["features"].mean(axis=0) for i in split_ids["val"]])
    np.testing.assert_allclose(arrays["fc"], expected, rtol=1e-3, atol=1e-3)


def _corrupt(line, field, value):
    fields = line.split("\t")
    fields[bottomup.FIELDS.index(field)] = value
    return "\t".join(fields)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("features", "AAAA!!!!", "row 3: field 'features' is not valid base64"),
        ("boxes", "AA!A", "row 3: field 'boxes' is not valid base64"),
        ("num_boxes", "37", "row 3: field 'boxes' holds 576 bytes, not num_boxes=37 x 4 float32"),
        ("num_boxes", "36.0", "row 3: field 'num_boxes' is not an integer"),
        ("image_id", "coco_1", "row 3: field 'image_id' is not an integer"),
        ("num_boxes", "101", "row 3: field 'num_boxes' is 101, not in 1..max_boxes=100; rerun with max_boxes >= 101"),
    ],
)
def test_malformed_row_is_named(data, split_ids, tmp_path, field, value, message):
    rows = _rows(_all_ids(split_ids))
    tsv = tmp_path / "bad.tsv"
    write_bottomup_tsv(tsv, rows)
    lines = tsv.read_bytes().decode().split("\r\n")
    # Row 3 is an image of the labels with 36 boxes (rows cycle 10, 36, 100 before the shuffle).
    row3 = next(i for i, r in enumerate(rows) if len(r["boxes"]) == 36)
    lines[2], lines[row3] = lines[row3], lines[2]
    lines[2] = _corrupt(lines[2], field, value)
    tsv.write_bytes("\r\n".join(lines).encode())
    with pytest.raises(CaptionflowError) as err:
        import_bottomup([tsv], data / "labels.json", _outputs(tmp_path / "f"))
    text = str(err.value)
    assert f"{tsv} {message}" in text and "\n" not in text


def test_missing_columns_are_named(data, split_ids, tmp_path):
    tsv = tmp_path / "short.tsv"
    write_bottomup_tsv(tsv, _rows(_all_ids(split_ids)))
    lines = tsv.read_bytes().decode().split("\r\n")
    lines[1] = "\t".join(lines[1].split("\t")[:4])
    tsv.write_bytes("\r\n".join(lines).encode())
    with pytest.raises(
        CaptionflowError, match=r"short\.tsv row 2: 4 tab-separated fields, expected 6: missing 'boxes', 'features'"
    ):
        import_bottomup(tsv, data / "labels.json", _outputs(tmp_path / "f"))


def test_missing_and_duplicate_images_are_reported(data, split_ids, tmp_path):
    rows = _rows(_all_ids(split_ids))
    gone = set(split_ids["val"][:3]) | {split_ids["test"][0]}
    tsv = tmp_path / "partial.tsv"
    write_bottomup_tsv(tsv, [r for r in rows if r["image_id"] not in gone])
    with pytest.raises(CaptionflowError) as err:
        import_bottomup(tsv, data / "labels.json", _outputs(tmp_path / "f"))
    text = str(err.value)
    assert "4 images of" in text and "(val 3, test 1)" in text and "partial.tsv" in text and "\n" not in text
    assert f"first ids: {', '.join(map(str, split_ids['val'][:3] + split_ids['test'][:1]))}" in text
    # Only the requested splits have to be complete.
    import_bottomup(tsv, data / "labels.json", _outputs(tmp_path / "g", ["train"]))

    twice = tmp_path / "twice.tsv"
    write_bottomup_tsv(twice, rows + rows[:1])
    with pytest.raises(
        CaptionflowError,
        match=rf"twice\.tsv row {len(rows) + 1}: image {rows[0]['image_id']} is listed twice .*first at row 1 of all files",
    ):
        import_bottomup(twice, data / "labels.json", _outputs(tmp_path / "h"))


@pytest.mark.parametrize(
    "target, crash_at, rows_done",
    [
        # The D probe, then 10 rows decode and the 11th raises: rows of lines 9.. are
        # written but not committed, and are written again on resume.
        ("parse_row", 12, {"train": 8, "val": 8, "test": 8}),
        # Killed between two outputs' commits at line 16: train records 16, the others 8;
        # train's rows of lines 9..16 are then no duplicates of themselves.
        ("commit", 5, {"train": 16, "val": 8, "test": 8}),
    ],
)
def test_killed_import_resumes_to_identical_files(
    data, split_ids, tmp_path, monkeypatch, capsys, target, crash_at, rows_done
):
    rows = _rows(_all_ids(split_ids) + [10**9 + 1, 10**9 + 2, 10**9 + 3])
    tsvs = _write_shards(tmp_path, rows)
    reference = _outputs(tmp_path / "ref")
    import_bottomup(tsvs, data / "labels.json", reference, chunk_rows=8)

    real = getattr(bottomup, target)
    calls = {"n": 0}

    def crashing(*args):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise _Crash
        return real(*args)

    run = _outputs(tmp_path / "run")
    monkeypatch.setattr(bottomup, target, crashing)
    with pytest.raises(_Crash):
        import_bottomup(tsvs, data / "labels.json", run, chunk_rows=8)
    for split, path in run.items():
        assert not path.exists() and path.with_name(path.name + ".partial").exists()
        assert json.loads(path.with_name(path.name + ".partial.json").read_text())["rows"] == rows_done[split]
    monkeypatch.setattr(bottomup, target, real)
    capsys.readouterr()
    import_bottomup(tsvs, data / "labels.json", run, chunk_rows=8)
    assert "resuming the bottom-up import at TSV row 8" in capsys.readouterr().out
    for split in SPLITS:
        a, a_attrs = _read(run[split])
        b, b_attrs = _read(reference[split])
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in b)
        assert a_attrs == b_attrs
    assert not list((tmp_path / "run").glob("*.partial*"))


def _region_cfg(**kw):
    return build(
        RegionConfig,
        **{
            "max_boxes": 4,
            "detector_min_size": 64,
            "detector_max_size": 64,
            "detector_proposals": 20,
            "batch_size": 2,
            "num_workers": 0,
            "chunk_batches": 1,
            **kw,
        },
    )


def _killed_region_extraction(data, manifest, outputs, cfg, monkeypatch):
    """extract_regions killed in its second batch, after the first chunk was committed."""
    real_forward = regions.RegionFeatures.forward
    calls = {"n": 0}

    def crashing_forward(self, images):
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Crash
        return real_forward(self, images)

    monkeypatch.setattr(regions.RegionFeatures, "forward", crashing_forward)
    with pytest.raises(_Crash):
        extract_regions(data / "labels.json", manifest, outputs, cfg)
    monkeypatch.setattr(regions.RegionFeatures, "forward", real_forward)


def test_region_extractor_layout_and_resume(data, split_ids, tmp_path, monkeypatch, capsys):
    cfg = _region_cfg()
    reference = _outputs(tmp_path / "ref", ["test"])
    extract_regions(data / "labels.json", data / "manifest.json", reference, cfg)
    arrays, attrs = _read(reference["test"])
    n = len(split_ids["test"])
    assert arrays["image_id"].tolist() == split_ids["test"]
    assert arrays["att"].shape == (n, 4, 1024) and arrays["att"].dtype == np.float32
    assert arrays["att_mask"].all() and (arrays["num_boxes"] == 4).all()
    assert arrays["boxes"].shape == (n, 4, 4) and 0 <= arrays["boxes"].min() and arrays["boxes"].max() <= 1
    assert (arrays["boxes"][..., 2:] >= arrays["boxes"][..., :2]).all()
    assert np.isfinite(arrays["att"]).all() and arrays["att"].std() > 0
    np.testing.assert_allclose(arrays["fc"], arrays["att"].mean(axis=1), rtol=1e-5, atol=1e-6)
    assert attrs["source"] == "fasterrcnn_resnet50_fpn" and attrs["feat_dim"] == 1024

    run = _outputs(tmp_path / "run", ["test"])
    _killed_region_extraction(data, data / "manifest.json", run, cfg, monkeypatch)
    capsys.readouterr()
    extract_regions(data / "labels.json", data / "manifest.json", run, cfg)
    assert f"resuming test.h5 at row 2 of {n}" in capsys.readouterr().out
    resumed, _ = _read(run["test"])
    assert all(np.array_equal(resumed[k], arrays[k]) for k in arrays)  # same seed, same numbers


def test_region_extraction_starts_over_when_a_source_image_changed(data, tmp_path, monkeypatch, capsys):
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["sources"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    run = _outputs(tmp_path / "run", ["test"])
    _killed_region_extraction(data, tmp_path / "manifest.json", run, _region_cfg(), monkeypatch)
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "sources": "a replaced source image"}))
    capsys.readouterr()
    extract_regions(data / "labels.json", tmp_path / "manifest.json", run, _region_cfg())
    out = capsys.readouterr().out
    assert "settings changed since the interrupted run of test.h5: starting over" in out and "resuming" not in out
    assert _read(run["test"])[1]["sources"] == "a replaced source image"


def test_region_extractor_pads_without_detections(data, split_ids, tmp_path):
    # No score passes 1.0 and the RPN keeps at most 2 proposals: the grid's whole-image box fills in.
    out = _outputs(tmp_path, ["test"])
    extract_regions(
        data / "labels.json",
        data / "manifest.json",
        out,
        _region_cfg(detector_score_thresh=1.0, detector_proposals=2, max_boxes=5),
    )
    arrays, _ = _read(out["test"])
    whole = (arrays["boxes"] == np.array([0, 0, 1, 1], dtype=np.float32)).all(axis=-1)
    assert whole.any(axis=1).all() and arrays["att_mask"].all()
    assert np.array_equal(
        regions.grid_boxes((10, 20), 6)[[0, 1, 5]],
        torch.tensor([[0, 0, 20, 10], [0, 0, 10, 5], [0, 0, 20 / 3, 10 / 3]]),
    )


def test_detector_weights_offline_and_local(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(CaptionflowError) as err:
        create_detector("coco")
    text = str(err.value)
    assert (
        "could not load the COCO weights of fasterrcnn_resnet50_fpn (URLError" in text
        and "local .pth" in text
        and "\n" not in text
    )

    # A trained torchvision detector's file: FrozenBatchNorm2d saves no num_batches_tracked.
    source = create_detector("none", seed=3, num_classes=5)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"model": state}, tmp_path / "det.pth")
    loaded = create_detector(str(tmp_path / "det.pth"), seed=0)
    assert loaded.roi_heads.box_predictor.cls_score.out_features == 5
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in state.items())


def test_region_features_feed_training_with_their_mask(data, split_ids, tmp_path):
    """Imported bottom-up features (variable box counts) and Faster R-CNN regions both train
    a captioner; the store hands the mask to the model."""
    from captionflow.data.captions import FeatureStore
    from captionflow.models import checkpoint
    from captionflow.training import xe

    tsv = _write_shards(tmp_path, _rows(_all_ids(split_ids)), shards=1)
    imported = _outputs(tmp_path / "bottomup")
    import_bottomup(tsv, data / "labels.json", imported, max_boxes=100)
    extracted = _outputs(tmp_path / "regions")
    extract_regions(data / "labels.json", data / "manifest.json", extracted, _region_cfg(max_boxes=4))
    for name, outputs in (("bottomup", imported), ("regions", extracted)):
        store = FeatureStore(outputs["train"])
        batch = store.get([0, 1, 2])
        assert batch["att_mask"].dtype == torch.bool and batch["att_mask"].shape == batch["att"].shape[:2]
        out = tmp_path / f"xe_{name}"
        xe.train(
            outputs["train"],
            outputs["val"],
            data / "labels.h5",
            data / "labels.json",
            data / "references.json",
            out / "model.pt",
            out / "history.tsv",
            "aoanet",
            {"hidden_size": 32, "embed_size": 16, "n_heads": 2, "refiner_layers": 1},
            build(xe.XEConfig, epochs=1, batch_size=8, device="cpu"),
        )
        assert checkpoint.load(out / "model.pt")["model_args"]["feat_dim"] == store.feat_dim
    bottomup_store = FeatureStore(imported["train"])
    assert not bottomup_store.get(list(range(len(bottomup_store))))["att_mask"].all()  # 10 and 36 of 100 boxes
