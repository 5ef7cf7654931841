"""train_retrieval's optimisation options (GNA-RNN's train.lua settings): Adam's betas, no
learning-rate decay at lr_decay 1, the loss-exploded stop, and the training-time random crop
of the images the fine-tuned backbone reads."""

import pytest
import torch

from captionflow.config import build
from captionflow.errors import CaptionflowError
from captionflow.features.backbones import Backbone
from captionflow.models import checkpoint
from captionflow.models.retrieval import create_retrieval_model
from captionflow.training import retrieval
from captionflow.training.retrieval import RetrievalConfig, random_crop

BACKBONE = Backbone("resnet18", "none", 0, 64, 0)  # the one that extracted tiny_data's features (64-px images)
ARGS = {"embed_size": 16, "hidden_size": 16, "units": 16, "dropout": 0.0}


def _train(d, out, **kw):
    cfg = build(RetrievalConfig, device="cpu", **{"model_args": ARGS, "epochs": 2, "batch_size": 64, **kw})
    retrieval.train(
        d / "train.h5",
        d / "val.h5",
        d / "labels.h5",
        d / "labels.json",
        out / "model.pt",
        out / "history.tsv",
        cfg,
        manifest=d / "manifest.json",
        backbone=BACKBONE,
    )


@pytest.fixture
def optimizers(monkeypatch):
    """Every torch.optim.Adam that training builds, kept for inspection."""
    made, real = [], torch.optim.Adam

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(torch.optim, "Adam", spy)
    return made


@pytest.mark.parametrize("decay, last_lr", [(1.0, 4e-4), (0.5, 1e-4)], ids=["no_decay", "halved_twice"])
def test_betas_reach_adam_and_lr_decay_one_keeps_the_rate(tiny_data, tmp_path, optimizers, decay, last_lr):
    # two epochs, a decay after each: 4e-4 stays 4e-4 at factor 1 and is 4e-4 / 4 at factor 0.5
    _train(tiny_data, tmp_path, lr=4e-4, betas=[0.8, 0.999], lr_decay=decay, lr_decay_every=1)
    (adam,) = optimizers
    assert [g["betas"] for g in adam.param_groups] == [(0.8, 0.999)]
    assert adam.param_groups[0]["lr"] == pytest.approx(last_lr, rel=1e-12)


def test_default_betas_are_torchs(tiny_data, tmp_path, optimizers):
    _train(tiny_data, tmp_path, epochs=1)
    assert optimizers[0].param_groups[0]["betas"] == (0.9, 0.999)  # today's Adam: the demo's numbers stay


@pytest.mark.parametrize("limit", [20.0, 0.0], ids=["stops", "off"])
def test_a_loss_above_loss_explode_times_the_first_stops_in_one_line_writing_nothing(
    tiny_data, tmp_path, monkeypatch, limit
):
    # the third step's loss is forced to 100 x its value (BCE of an untrained model: ~0.7, so
    # ~70 against 20 x ~0.7 = ~14); off (0) the same run trains to the end
    real, calls = torch.nn.functional.binary_cross_entropy_with_logits, {"n": 0}

    def forced(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * 100 if calls["n"] == 3 else loss

    monkeypatch.setattr(retrieval.F, "binary_cross_entropy_with_logits", forced)
    if not limit:
        _train(tiny_data, tmp_path, batch_size=16, loss_explode=limit)
        assert (tmp_path / "model.pt").exists()
        return
    with pytest.raises(CaptionflowError) as err:
        _train(tiny_data, tmp_path, batch_size=16, loss_explode=limit, checkpoint_every=1)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("train_retrieval stopped at epoch 0, step 3: the loss ")
    assert "exceeds retrieval.loss_explode = 20 x the first loss" in message
    assert "no checkpoint was written: lower retrieval.lr" in message
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "history.tsv").exists()
    # the state of step 2 (before the exploded step) is all there is
    assert torch.load(tmp_path / "state/last.pt", weights_only=False)["progress"]["step"] == 2


def test_random_crop_is_one_window_per_batch_from_the_source_range():
    # 8-px images cropped to 6: room 2, so GNA-RNN's torch.random(2) (1-based) gives corners 0 or 1
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.uint8).view(2, 3, 8, 8)
    corners = set()
    for seed in range(64):
        crop = random_crop(images, 6, torch.Generator().manual_seed(seed))
        assert crop.shape == (2, 3, 6, 6)
        top, left = divmod(int(crop[0, 0, 0, 0]), 8)  # pixel value = row * 8 + column in image 0, channel 0
        assert torch.equal(crop, images[..., top : top + 6, left : left + 6])  # the same window for both, unflipped
        corners.add((top, left))
        again = random_crop(images, 6, torch.Generator().manual_seed(seed))
        assert torch.equal(crop, again)  # the seed decides it
    assert corners == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_augment_crops_the_backbones_training_images_only(tiny_data, tmp_path, monkeypatch):
    """With the backbone fine-tuned from step 0, every training step's images are 48-px crops
    of the 64-px resized images; validation reads whole images."""
    seen = {"train": [], "val": []}
    real_forward, real_features = retrieval.ImageSide.forward, retrieval.image_features

    def forward(self, images):
        seen["train"].append(tuple(images.shape[-2:]))
        return real_forward(self, images)

    def features(grid, files, device):
        seen["val"].append(tuple(files[0].shape[-2:]))
        return real_features(grid, files, device)

    monkeypatch.setattr(retrieval.ImageSide, "forward", forward)
    monkeypatch.setattr(retrieval, "image_features", features)
    _train(tiny_data, tmp_path, epochs=1, finetune_backbone_after=0, augment=48, freeze_stages=4)
    assert seen["train"] and set(seen["train"]) == {(48, 48)}
    assert seen["val"] == [(64, 64)]
    seen["train"].clear()
    _train(tiny_data, tmp_path / "whole", epochs=1, finetune_backbone_after=0, freeze_stages=4)
    assert set(seen["train"]) == {(64, 64)}  # augment 0: whole images


def test_a_crop_as_large_as_the_images_is_refused_in_one_line(tiny_data, tmp_path):
    with pytest.raises(
        CaptionflowError, match=r"^retrieval.augment = 64 crops 64-px images \(resize.size\): set it below 64, or 0$"
    ):
        _train(tiny_data, tmp_path, finetune_backbone_after=0, augment=64)


@pytest.mark.parametrize("mode", ["value", "norm"])
def test_grad_clip_mode_value_clamps_each_element_and_norm_the_whole(tiny_data, tmp_path, mode):
    # one SGD step (one batch holds every caption; momentum's first step is lr x gradient) at
    # lr 1 and grad_clip 1e-4: value moves no weight by more than 1e-4 but the whole by more
    # than 10 x that; norm moves the whole by at most 1e-4 (float32 rounding of ~0.1 weights: 1e-8)
    clip = 1e-4
    _train(tiny_data, tmp_path, epochs=1, batch_size=1000, optimizer="sgd", lr=1.0, grad_clip=clip, grad_clip_mode=mode)
    ckpt = checkpoint.load(tmp_path / "model.pt")
    torch.manual_seed(0)  # retrieval.seed's default: the initial weights again
    # the weights only: BatchNorm's running statistics move without a gradient
    initial = dict(create_retrieval_model("gna_rnn", **ckpt["model_args"]).named_parameters())
    moved = torch.cat([(ckpt["model"][k] - v.detach()).flatten() for k, v in initial.items()])
    if mode == "value":
        assert moved.abs().max() <= clip * 1.001 and moved.norm() > 10 * clip
    else:
        assert moved.norm() <= clip * 1.001 and moved.abs().max() > 0


class _Crash(Exception):
    pass


def test_augmented_end_to_end_run_resumes_to_identical_weights(tiny_data, tmp_path, monkeypatch):
    # the crops come from the seed and the step, not from a stream a crash would lose
    kw = {"batch_size": 16, "checkpoint_every": 3, "finetune_backbone_after": 2, "augment": 56, "freeze_stages": 4}
    _train(tiny_data, tmp_path / "ref", **kw)
    real, calls = retrieval.caption_tensors, {"n": 0}

    def crash(*args):
        calls["n"] += 1
        if calls["n"] == 10:
            raise _Crash
        return real(*args)

    monkeypatch.setattr(retrieval, "caption_tensors", crash)
    with pytest.raises(_Crash):
        _train(tiny_data, tmp_path / "run", **kw)
    monkeypatch.setattr(retrieval, "caption_tensors", real)
    _train(tiny_data, tmp_path / "run", **kw)
    reference, resumed = checkpoint.load(tmp_path / "ref/model.pt"), checkpoint.load(tmp_path / "run/model.pt")
    for part in ("model", "backbone"):
        assert all(torch.equal(reference[part][k], resumed[part][k]) for k in reference[part])
