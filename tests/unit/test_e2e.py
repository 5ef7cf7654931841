"""finetune_e2e: augmentation, freezing, preemption (SIGTERM) with exact resume, and that it
fine-tunes the very network extraction ran."""

import os
import signal

import h5py
import numpy as np
import pytest
import torch

from captionflow.config import build
from captionflow.features.backbones import Backbone, create_backbone, freeze_leading_stages
from captionflow.features.extract import FeatureConfig, ImageFiles, extract_features, image_features, split_images
from captionflow.models import checkpoint
from captionflow.training import e2e, xe
from captionflow.training.e2e import E2EConfig, augment
from captionflow.training.xe import XEConfig

MODEL_ARGS = {"embed_size": 16, "hidden_size": 32, "att_size": 16, "dropout": 0.2}


@pytest.fixture(scope="module")
def xe_checkpoint(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("xe")
    d = tiny_data
    xe.train(
        d / "train.h5",
        d / "val.h5",
        d / "labels.h5",
        d / "labels.json",
        d / "references.json",
        out / "model.pt",
        out / "history.tsv",
        "show_attend_tell",
        MODEL_ARGS,
        build(XEConfig, epochs=1, batch_size=8),
    )
    return out / "model.pt"


RESNET18 = Backbone("resnet18", "none", 0, 64, 0)  # the one that extracted tiny_data's features


def _e2e(data, init, out, cfg, backbone=RESNET18):
    d = data
    e2e.train(
        d / "labels.h5",
        d / "labels.json",
        d / "references.json",
        d / "manifest.json",
        init,
        out / "model.pt",
        out / "backbone.pth",
        out / "history.tsv",
        backbone,
        cfg,
    )
    return checkpoint.load(out / "model.pt"), torch.load(out / "backbone.pth", weights_only=True)


def test_augmentation_keeps_left_left_and_hue():
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    images[:, 0, :, :8] = 200  # a red band on the left
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 32, 32)
    assert out[:, 0, :, :4].mean() > 150 and out[:, 0, :, -8:].mean() < 5  # still on the left
    assert out[:, 1:].max() == 0  # red stays red


def test_freeze_leading_stages():
    backbone = create_backbone("resnet18")
    freeze_leading_stages(backbone, 2)  # stem and layer1
    trunk = list(backbone.trunk.children())
    assert not any(p.requires_grad for m in trunk[:5] for p in m.parameters())
    assert all(p.requires_grad for m in trunk[5:] for p in m.parameters())


def test_sigterm_saves_state_and_the_rerun_ends_identical(tiny_data, xe_checkpoint, tmp_path, monkeypatch, capsys):
    cfg = build(
        E2EConfig, epochs=2, batch_size=4, checkpoint_every=100, warmup_steps=2, backbone_lr=1e-4, freeze_stages=1
    )
    ref_model, ref_backbone = _e2e(tiny_data, xe_checkpoint, tmp_path / "ref", cfg)
    assert ref_model["stage"] == "e2e"
    # the fine-tuned backbone loads where extraction loads weights
    create_backbone("resnet18", str(tmp_path / "ref/backbone.pth"))

    real = e2e.smoothed_nll
    calls = {"n": 0}

    def sigterm_on_call_7(*args):
        calls["n"] += 1
        if calls["n"] == 7:  # epoch 1, step 7 (5 steps per epoch): what SLURM sends before a kill
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(e2e, "smoothed_nll", sigterm_on_call_7)
    with pytest.raises(SystemExit) as exit_:
        _e2e(tiny_data, xe_checkpoint, tmp_path / "run", cfg)
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    assert "SIGTERM received" in out and "preempted (SIGTERM): state saved at step 7" in out
    assert torch.load(tmp_path / "run/state/last.pt", weights_only=True)["progress"]["step"] == 7
    assert not (tmp_path / "run/model.pt").exists()
    assert signal.getsignal(signal.SIGTERM) is not None

    monkeypatch.setattr(e2e, "smoothed_nll", real)
    run_model, run_backbone = _e2e(tiny_data, xe_checkpoint, tmp_path / "run", cfg)
    assert "resuming from" in capsys.readouterr().out
    assert all(torch.equal(ref_model["model"][k], run_model["model"][k]) for k in ref_model["model"])
    assert all(torch.equal(ref_backbone[k], run_backbone[k]) for k in ref_backbone)


def test_e2e_starts_from_the_network_extraction_ran_with_a_random_init_of_another_seed(
    tiny_data, xe_checkpoint, tmp_path
):
    # weights none and seed 7 (the config's seed), e2e.seed 0: fine-tuning at a learning
    # rate of 0 must leave exactly the network whose features XE was trained on
    d = tiny_data
    backbone = Backbone("resnet18", "none", 7, 64, 0)
    extracted = tmp_path / "features/train.h5"
    extract_features(
        d / "labels.json",
        d / "manifest.json",
        {"train": extracted},
        backbone,
        build(FeatureConfig, batch_size=8, num_workers=0),
    )
    _e2e(
        d,
        xe_checkpoint,
        tmp_path / "e2e",
        build(E2EConfig, epochs=1, batch_size=4, backbone_lr=0.0, freeze_stages=0, augment=False),
        backbone,
    )
    started_from = Backbone("resnet18", str(tmp_path / "e2e/backbone.pth"), 0, 64, 0).build()
    splits, size = split_images(d / "labels.json", d / "manifest.json")
    files = ImageFiles(splits["train"][1], size)
    with h5py.File(extracted) as f:
        stored = torch.from_numpy(np.asarray(f["att"]))
    assert torch.equal(image_features(started_from, files, torch.device("cpu"))["att"], stored)
    # control: the random init of seed 0 is another network, with other features
    other = Backbone("resnet18", "none", 0, 64, 0).build()
    assert not torch.allclose(image_features(other, files, torch.device("cpu"))["att"], stored)
