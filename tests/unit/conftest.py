"""Fixtures of the unit tests: a small exported bundle (fc on tiny_data) and its helpers."""

import pytest
import torch

from captionflow.data.captions import read_labels_json
from captionflow.deploy.bundle import export_model
from captionflow.models import checkpoint, create_model

DECODING = {"beam_size": 2, "max_len": 8, "alpha": 0.0, "block_trigrams": False}


def _checkpoint(data, path, name="fc", seed=0, **args):
    index = read_labels_json(data / "labels.json")
    feat_dim = 512  # resnet18
    torch.manual_seed(seed)
    model_args = {"vocab_size": len(index["ix_to_word"]), "feat_dim": feat_dim, **args}
    model = create_model(name, **model_args)
    checkpoint.save(
        {"model": model.state_dict(), "vocab_hash": index["vocab_hash"], "model_name": name, "model_args": model_args},
        path,
    )
    return model


def _export(data, out, ckpt):
    export_model(
        ckpt,
        data / "labels.json",
        data / "test.h5",
        data / "manifest.json",
        None,
        None,
        DECODING,
        "exp",
        ["xe"],
        "0" * 64,
        out / "bundle.pt",
        out / "bundle.json",
    )
    return out


@pytest.fixture(scope="module")
def bundle(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    _checkpoint(tiny_data, root / "model.pt", embed_size=16, hidden_size=32)
    return _export(tiny_data, root / "export", root / "model.pt")


def _test_images(data):
    index = read_labels_json(data / "labels.json")
    return [data / "demo" / img["file_path"] for img in index["images"] if img["split"] == "test"]
