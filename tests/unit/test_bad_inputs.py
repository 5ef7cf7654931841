"""Bad training inputs get one line: NaN never becomes a checkpoint, damaged or foreign
files are named, and a pickle that carries code is refused before any of it runs."""

import json
import math
import os

import h5py
import numpy as np
import pytest
import torch
import torchvision

from captionflow.config import build
from captionflow.data.captions import FeatureStore, SplitData
from captionflow.errors import CaptionflowError
from captionflow.evaluation.captioning import DecodingConfig, evaluate
from captionflow.features.backbones import Backbone, create_backbone
from captionflow.features.bottomup import import_bottomup, write_bottomup_tsv
from captionflow.features.extract import FeatureConfig, extract_features
from captionflow.metrics.cider import document_frequencies_from_labels
from captionflow.models import checkpoint
from captionflow.training import e2e, scst, xe
from captionflow.training.e2e import E2EConfig
from captionflow.training.scst import SCSTConfig
from captionflow.training.xe import XEConfig

MODEL_ARGS = {"embed_size": 16, "hidden_size": 32, "att_size": 16, "dropout": 0.2}
SPLITS = ("train", "val", "test")


class CodeCarrier:
    """Unpickling this runs a shell command that creates `marker` (if anything lets it run)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _code_pickle(path, marker):
    torch.save({"model": {"w": torch.zeros(2)}, "payload": CodeCarrier(marker)}, path)
    return path


def _one_line(err):
    message = str(err.value)
    assert "\n" not in message, message
    return message


def _xe(data, out, cfg, features=None):
    train, val = features or (data / "train.h5", data / "val.h5")
    xe.train(
        train,
        val,
        data / "labels.h5",
        data / "labels.json",
        data / "references.json",
        out / "model.pt",
        out / "history.tsv",
        "show_attend_tell",
        MODEL_ARGS,
        cfg,
    )


def _scst(data, init, out, cfg, features=None):
    train, val = features or (data / "train.h5", data / "val.h5")
    scst.train(
        train,
        val,
        data / "labels.h5",
        data / "labels.json",
        data / "references.json",
        init.parent / "df.npz",
        init,
        out / "model.pt",
        out / "history.tsv",
        out / "reward.txt",
        cfg,
    )


def _e2e(data, init, out, cfg):
    e2e.train(
        data / "labels.h5",
        data / "labels.json",
        data / "references.json",
        data / "manifest.json",
        init,
        out / "model.pt",
        out / "backbone.pth",
        out / "history.tsv",
        Backbone("resnet18", "none", 0, 64, 0),
        cfg,
    )


def _assert_nothing_trusted(out):
    """No declared output, and no saved state or best model of non-finite weights."""
    assert not (out / "model.pt").exists() and not (out / "history.tsv").exists()
    for name in ("last.pt", "best.pt"):
        path = out / "state" / name
        if path.exists():
            state = torch.load(path, weights_only=True)["model"]
            assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.fixture(scope="module")
def xe_checkpoint(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("xe")
    _xe(tiny_data, out, build(XEConfig, epochs=1, batch_size=8))
    document_frequencies_from_labels(tiny_data / "labels.h5", tiny_data / "labels.json").save(out / "df.npz")
    return out / "model.pt"


def _copy_features(data, folder, change):
    """Copies of the tiny train/val/test features, each changed by change(name, array)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in SPLITS:
        paths[split] = folder / f"{split}.h5"
        with h5py.File(data / f"{split}.h5", "r") as src, h5py.File(paths[split], "w") as dst:
            for name in src:
                dst.create_dataset(name, data=change(name, src[name][()]) if name in ("att", "fc") else src[name][()])
    return paths


# ---- NaN never becomes a checkpoint ------------------------------------------------------


def test_infinite_lr_stops_xe_before_any_nan_is_saved(tiny_data, tmp_path):
    """lr = inf (the schema refuses it; the library's guard must catch it too) turns the
    weights non-finite at the first step (a state is due after it): the run stops there."""
    with pytest.raises(CaptionflowError) as err:
        _xe(tiny_data, tmp_path, build(XEConfig, epochs=2, batch_size=8, lr=math.inf, checkpoint_every=1))
    message = _one_line(err)
    assert message.startswith(
        "train_xe stopped at epoch 0, step 1: the weights are not finite numbers after the optimizer step; "
    )
    assert "likely cause: xe.lr = inf" in message and "no checkpoint was written" in message
    _assert_nothing_trusted(tmp_path)


def test_nan_label_smoothing_stops_at_the_first_step(tiny_data, tmp_path):
    with pytest.raises(CaptionflowError) as err:
        _xe(tiny_data, tmp_path, build(XEConfig, epochs=1, batch_size=8, label_smoothing=math.nan))
    message = _one_line(err)
    assert message.startswith("train_xe stopped at epoch 0, step 1: the loss is nan and the gradient norm is nan")
    assert "xe.label_smoothing = nan" in message
    _assert_nothing_trusted(tmp_path)


def test_infinite_lr_stops_scst(tiny_data, xe_checkpoint, tmp_path):
    with pytest.raises(CaptionflowError) as err:
        _scst(tiny_data, xe_checkpoint, tmp_path, build(SCSTConfig, epochs=1, batch_size=3, samples=3, lr=math.inf))
    assert _one_line(err).startswith("train_scst stopped at epoch 0, step ") and "scst.lr = inf" in str(err.value)
    _assert_nothing_trusted(tmp_path)
    assert not (tmp_path / "reward.txt").exists()


def test_infinite_lr_stops_e2e(tiny_data, xe_checkpoint, tmp_path):
    with pytest.raises(CaptionflowError) as err:
        _e2e(tiny_data, xe_checkpoint, tmp_path, build(E2EConfig, epochs=1, batch_size=8, lr=math.inf, augment=False))
    assert _one_line(err).startswith("finetune_e2e stopped at epoch 0, step ") and "e2e.lr = inf" in str(err.value)
    _assert_nothing_trusted(tmp_path)
    assert not (tmp_path / "backbone.pth").exists()


def test_garbage_feature_rows_stop_training_before_it_starts(tiny_data, tmp_path):
    def garbage(name, array):
        if len(array) < 10:  # val and test stay sound
            return array
        array = array.copy()
        array[3] = np.nan if name == "att" else array[3]
        array[5] = np.inf
        return array

    paths = _copy_features(tiny_data, tmp_path / "features", garbage)
    with pytest.raises(CaptionflowError) as err:
        _xe(tiny_data, tmp_path / "xe", build(XEConfig, epochs=1, batch_size=8), (paths["train"], paths["val"]))
    ids = h5py.File(paths["train"], "r")["image_id"][()]
    assert _one_line(err).startswith(
        f"features {paths['train']}: row 3 (image {ids[3]}) of att holds NaN or inf values (2 such rows"
    )
    _assert_nothing_trusted(tmp_path / "xe")
    assert not (tmp_path / "xe/state").exists()
    # read batch by batch (a file too large for memory): the rows read are checked
    store = FeatureStore(paths["train"], max_memory_mb=0)
    assert store.get([0, 1])["att"].shape[0] == 2
    with pytest.raises(CaptionflowError, match=rf"row 5 \(image {ids[5]}\) of att holds NaN or inf"):
        store.get([7, 5, 0])
    assert FeatureStore(paths["train"], blind=True).get([3])["att"].abs().sum() == 0  # blind reads no values


# ---- damaged and foreign files -----------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "not_hdf5", "empty"])
def test_damaged_features_and_labels_files_are_named(tiny_data, tmp_path, damage):
    def damaged(name):
        path = tmp_path / name
        raw = (tiny_data / name).read_bytes()
        path.write_bytes({"truncated": raw[: len(raw) // 2], "not_hdf5": b"image_id,att\n1,2\n", "empty": b""}[damage])
        return path

    features, labels = damaged("train.h5"), damaged("labels.h5")
    with pytest.raises(CaptionflowError) as err:
        SplitData(tiny_data / "labels.h5", tiny_data / "labels.json", features, "train")
    assert _one_line(err).startswith(f"features {features} is not a readable HDF5 file (truncated or another format: ")
    assert "rerun snakemake to extract the features again" in str(err.value)
    with pytest.raises(CaptionflowError) as err:
        SplitData(labels, tiny_data / "labels.json", tiny_data / "train.h5", "train")
    assert _one_line(err).startswith(f"labels {labels} is not a readable HDF5 file") and "prepro_labels" in str(
        err.value
    )
    with pytest.raises(CaptionflowError, match="is not a readable HDF5 file"):
        _xe(tiny_data, tmp_path / "xe", build(XEConfig, epochs=1), (features, tiny_data / "val.h5"))


def test_hdf5_that_is_no_features_file_and_broken_labels_index(tiny_data, tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["labels"] = np.zeros(3)
    with pytest.raises(CaptionflowError, match=f"features {other} has no att, fc, image_id dataset"):
        FeatureStore(other)
    index = tmp_path / "labels.json"
    index.write_text((tiny_data / "labels.json").read_text()[:100])
    with pytest.raises(CaptionflowError, match=f"labels JSON {index} is not valid JSON"):
        SplitData(tiny_data / "labels.h5", index, tiny_data / "train.h5", "train")


@pytest.fixture(scope="module")
def wide(tiny_data, tmp_path_factory):
    """Features of 2048 dimensions (the tiny 512-d ones tiled) and an XE checkpoint trained on them."""
    root = tmp_path_factory.mktemp("wide")
    paths = _copy_features(tiny_data, root, lambda name, a: np.concatenate([a] * 4, axis=-1))
    out = root / "xe"
    _xe(tiny_data, out, build(XEConfig, epochs=1, batch_size=8), (paths["train"], paths["val"]))
    document_frequencies_from_labels(tiny_data / "labels.h5", tiny_data / "labels.json").save(out / "df.npz")
    return out / "model.pt"


def test_features_of_another_dimension_than_the_checkpoint_are_refused(tiny_data, wide, tmp_path):
    d = tiny_data
    with pytest.raises(CaptionflowError) as err:
        evaluate(
            wide,
            d / "test.h5",
            d / "labels.h5",
            d / "labels.json",
            d / "references.json",
            tmp_path / "p.json",
            tmp_path / "m.json",
            build(DecodingConfig, device="cpu"),
        )
    assert _one_line(err).startswith(
        f"features {d / 'test.h5'} has 512-d features, but checkpoint {wide} was trained on 2048-d features; "
    )
    assert "features.backbone" in str(err.value) and not (tmp_path / "m.json").exists()
    with pytest.raises(CaptionflowError, match="has 512-d features, but checkpoint .* was trained on 2048-d"):
        _scst(d, wide, tmp_path / "scst", build(SCSTConfig, epochs=1, batch_size=3, samples=3))
    with pytest.raises(CaptionflowError) as err:
        _e2e(d, wide, tmp_path / "e2e", build(E2EConfig, epochs=1))
    assert _one_line(err).startswith("backbone resnet18 (features.backbone) has 512-d features, but checkpoint")
    with pytest.raises(CaptionflowError, match="are 512-d but .* are 2048-d"):  # train and val of two backbones
        _xe(d, tmp_path / "xe", build(XEConfig, epochs=1), (wide.parents[1] / "train.h5", d / "val.h5"))


# ---- checkpoints: code never runs, our line comes first ---------------------------------


def test_the_code_carrier_would_run_code_without_weights_only(tmp_path):
    """Control: the pickle used below really runs its code when loaded unsafely."""
    marker = tmp_path / "ran"
    torch.load(_code_pickle(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


def test_code_carrying_checkpoint_is_refused_first_with_our_line(tiny_data, tmp_path):
    marker = tmp_path / "ran"
    evil = _code_pickle(tmp_path / "model.pt", marker)
    for load in (checkpoint.load, lambda p: checkpoint.load_model(p, "any")):
        with pytest.raises(CaptionflowError) as err:
            load(evil)
        message = _one_line(err)
        assert message.startswith(
            f"checkpoint {evil} is not a captionflow checkpoint: it holds Python objects (posix.system"
        )
        assert message.index("do not load it with weights_only=False") == message.index("weights_only=False") - len(
            "do not load it with "
        )
        assert "Re-running" not in message
    d = tiny_data
    with pytest.raises(CaptionflowError, match="is not a captionflow checkpoint"):
        evaluate(
            evil,
            d / "test.h5",
            d / "labels.h5",
            d / "labels.json",
            d / "references.json",
            tmp_path / "p.json",
            tmp_path / "m.json",
            build(DecodingConfig, device="cpu"),
        )
    assert not marker.exists()


def test_code_carrying_backbone_weights_are_refused(tmp_path):
    marker = tmp_path / "ran"
    evil = _code_pickle(tmp_path / "r18.pth", marker)
    with pytest.raises(CaptionflowError) as err:
        create_backbone("resnet18", str(evil))
    assert _one_line(err).startswith(
        f"backbone weights file {evil} is not a state dict of tensors: it holds Python objects"
    )
    assert "features.weights" in str(err.value) and not marker.exists()


def test_code_carrying_state_is_set_aside_and_training_starts_over(tiny_data, tmp_path, capsys):
    marker = tmp_path / "ran"
    state = tmp_path / "xe/state/last.pt"
    state.parent.mkdir(parents=True)
    _code_pickle(state, marker)
    evil = state.read_bytes()
    _xe(tiny_data, tmp_path / "xe", build(XEConfig, epochs=1, batch_size=8))
    out = capsys.readouterr().out
    assert f"state {state} is not a captionflow training state: it holds Python objects (posix.system)" in out
    assert "set aside as last.pt.unreadable, starting over" in out
    assert (state.parent / "last.pt.unreadable").read_bytes() == evil and not marker.exists()
    assert (tmp_path / "xe/model.pt").exists()


def test_checkpoints_of_nan_weights_or_no_model_are_refused(tmp_path, capsys, tiny_data):
    fc = {"w": torch.tensor([1.0, math.nan])}
    checkpoint.save({"model": fc, "vocab_hash": "abc", "model_name": "fc", "model_args": {}}, tmp_path / "nan.pt")
    with pytest.raises(CaptionflowError, match=r"holds NaN or inf weights \(w\): a diverged run wrote it"):
        checkpoint.load_model(tmp_path / "nan.pt")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "backbone.pth")
    with pytest.raises(
        CaptionflowError, match="is not a captionflow checkpoint .*no model, model_name, model_args, vocab_hash"
    ):
        checkpoint.load_model(tmp_path / "backbone.pth")
    # a saved state of NaN weights (an older captionflow wrote it) is set aside, not resumed
    state = tmp_path / "xe/state/last.pt"
    state.parent.mkdir(parents=True)
    torch.save({"key": "x", "model": fc, "progress": {}}, state)
    _xe(tiny_data, tmp_path / "xe", build(XEConfig, epochs=1, batch_size=8))
    assert "holds NaN or inf weights (w); set aside as last.pt.unreadable" in capsys.readouterr().out


# ---- extraction refuses non-finite rows --------------------------------------------------


def test_backbone_weights_of_nan_are_refused_and_nan_features_never_stored(tiny_data, tmp_path):
    state = torchvision.models.resnet18().state_dict()
    state["fc.bias"][0] = math.nan
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(CaptionflowError, match=r"nan.pth holds NaN or inf values \(fc.bias\)"):
        create_backbone("resnet18", str(tmp_path / "nan.pth"))
    del state["fc.bias"], state["fc.weight"]
    state["conv1.weight"] *= 1e38  # finite weights whose features overflow to inf and NaN
    torch.save(state, tmp_path / "huge.pth")
    outputs = {s: tmp_path / f"{s}.h5" for s in SPLITS}
    cfg = build(FeatureConfig, batch_size=4, num_workers=0)
    with pytest.raises(CaptionflowError) as err:
        extract_features(
            tiny_data / "labels.json",
            tiny_data / "manifest.json",
            outputs,
            Backbone("resnet18", str(tmp_path / "huge.pth"), 0, 64, 0),
            cfg,
        )
    first = json.loads((tiny_data / "labels.json").read_text())["images"][0]
    assert _one_line(err).startswith(f"resnet18 features of image {first['id']} (")
    assert "split train, row 0) are NaN or inf" in str(err.value) and not outputs["train"].exists()


def test_bottomup_rows_of_nan_are_refused_naming_the_line_and_image(tiny_data, tmp_path):
    images = json.loads((tiny_data / "labels.json").read_text())["images"]
    rows = []
    for n, img in enumerate(images):
        feats = np.ones((2, 8), np.float32)
        if n == 4:
            feats[1, 3] = math.nan
        rows.append(
            {
                "image_id": img["id"],
                "image_w": 64,
                "image_h": 64,
                "boxes": np.array([[0, 0, 8, 8]] * 2),
                "features": feats,
            }
        )
    write_bottomup_tsv(tmp_path / "r.tsv", rows)
    outputs = {s: tmp_path / f"{s}.h5" for s in SPLITS}
    with pytest.raises(CaptionflowError) as err:
        import_bottomup(tmp_path / "r.tsv", tiny_data / "labels.json", outputs, max_boxes=2)
    assert _one_line(err).startswith(
        f"{tmp_path / 'r.tsv'} row 5: image {images[4]['id']}: field 'features' holds NaN or inf values"
    )
    assert not any(p.exists() for p in outputs.values())
