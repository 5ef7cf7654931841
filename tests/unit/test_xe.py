"""train_xe pieces (loss, schedules, bucketing, checkpoints) and exact resume after a crash."""

import math

import pytest
import torch
from torch.nn import functional as F

from captionflow.config import build
from captionflow.errors import CaptionflowError
from captionflow.models import checkpoint, create_model
from captionflow.training import scst, xe
from captionflow.training.e2e import E2EConfig
from captionflow.training.losses import smoothed_nll
from captionflow.training.sampler import bucketed_batches
from captionflow.training.schedule import LRSchedule, ScheduleConfig
from captionflow.training.xe import XEConfig, scheduled_sampling_prob
from captionflow.utils.state import load_checked

MODEL_ARGS = {"embed_size": 16, "hidden_size": 32, "att_size": 16, "dropout": 0.2}


def test_smoothed_nll():
    logprobs = torch.randn(2, 4, 6).log_softmax(-1)
    targets = torch.randint(0, 6, (2, 4))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float)
    plain = F.nll_loss(logprobs[mask.bool()], targets[mask.bool()])
    assert smoothed_nll(logprobs, targets, mask, 0.0).item() == pytest.approx(plain.item(), rel=1e-6)
    uniform = -logprobs[mask.bool()].mean()
    assert smoothed_nll(logprobs, targets, mask, 1.0).item() == pytest.approx(uniform.item(), rel=1e-6)


def test_scheduled_sampling_is_an_inverse_sigmoid():
    assert scheduled_sampling_prob(1000, 0, 0.25) == 0.0
    k = 100
    assert scheduled_sampling_prob(0, k, 1.0) == pytest.approx(1 - k / (k + 1))
    assert scheduled_sampling_prob(k * math.log(k), k, 1.0) == pytest.approx(0.5)
    assert scheduled_sampling_prob(10**6, k, 0.25) == 0.25


def _lrs(cfg, steps, scores=()):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    schedule = LRSchedule(opt, ScheduleConfig.of(cfg, "xe"), total_steps=steps)
    lrs = [opt.param_groups[0]["lr"]]
    for s in range(1, steps + 1):
        opt.step()
        schedule.after_step(s)
        lrs.append(opt.param_groups[0]["lr"])
    for score in scores:
        schedule.after_epoch(score)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_warmup_then_cosine_and_plateau():
    cos = _lrs(build(XEConfig, lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1), 110)
    assert cos[0] == pytest.approx(0.1) and cos[9] == pytest.approx(1.0)
    assert cos[60] == pytest.approx(0.55, abs=1e-6) and cos[110] == pytest.approx(0.1)
    plateau = _lrs(
        build(XEConfig, lr=1.0, warmup_steps=4, schedule="plateau", plateau_factor=0.5, plateau_patience=0),
        6,
        scores=[1.0, 0.5, 0.4],
    )
    assert plateau[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and plateau[6] == 1.0
    assert plateau[-3:] == pytest.approx([1.0, 0.5, 0.25])  # no improvement -> halve, twice


@pytest.mark.parametrize("kind", ["cosine", "plateau"])
def test_every_parameter_group_warms_up_from_its_own_learning_rate(kind):
    # end-to-end training: the backbone's group has a tenth of the captioner's rate
    cfg = build(E2EConfig, lr=1.0, backbone_lr=0.1, warmup_steps=4, schedule=kind)
    groups = [
        {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": cfg.lr},
        {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": cfg.backbone_lr},
    ]
    opt = torch.optim.AdamW(groups)
    schedule = LRSchedule(opt, ScheduleConfig.of(cfg, "e2e"), total_steps=8)
    for s in range(1, 3):
        opt.step()
        schedule.after_step(s)
    captioner, backbone = (g["lr"] for g in opt.param_groups)
    assert captioner == pytest.approx(0.75) and backbone == pytest.approx(0.075)


@pytest.mark.parametrize("section", ["xe", "scst", "e2e"])
def test_an_unknown_schedule_is_refused_in_every_regime(section):
    config = build({"xe": XEConfig, "scst": scst.SCSTConfig, "e2e": E2EConfig}[section], schedule="linear")
    with pytest.raises(CaptionflowError, match=f"{section}.schedule 'linear' is not one of cosine, plateau"):
        ScheduleConfig.of(config, section)


def test_bucketed_batches_cover_everything_deterministically():
    lengths = [int(x) for x in torch.randint(1, 20, (503,))]
    a = bucketed_batches(lengths, 10, seed=3, epoch=2, bucket_factor=5)
    assert a == bucketed_batches(lengths, 10, seed=3, epoch=2, bucket_factor=5)
    assert a != bucketed_batches(lengths, 10, seed=3, epoch=3, bucket_factor=5)
    assert sorted(i for b in a for i in b) == list(range(503))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a) / len(a)
    assert spread < 5  # sorted pools of 5 batches: ~19/5 per batch; random batches spread ~15


def test_checkpoint_of_another_model_or_vocab_is_refused(tmp_path):
    fc = create_model("fc", vocab_size=10, feat_dim=8)
    checkpoint.save(
        {
            "model": fc.state_dict(),
            "vocab_hash": "abc",
            "model_name": "fc",
            "model_args": {"vocab_size": 10, "feat_dim": 8},
        },
        tmp_path / "fc.pt",
    )
    weights = checkpoint.load(tmp_path / "fc.pt")["model"]
    sat = create_model("show_attend_tell", vocab_size=10, feat_dim=8)
    with pytest.raises(CaptionflowError) as err:
        load_checked(sat, weights, tmp_path / "fc.pt", "model show_attend_tell")
    assert "missing keys" in str(err.value) and "unexpected keys" in str(err.value) and "\n" not in str(err.value)
    bigger = create_model("fc", vocab_size=10, feat_dim=8, hidden_size=64)
    with pytest.raises(CaptionflowError, match="shape mismatches .*lstm"):
        load_checked(bigger, weights, tmp_path / "fc.pt", "model fc")
    with pytest.raises(CaptionflowError, match="vocabulary abc, these labels have xyz"):
        checkpoint.load_model(tmp_path / "fc.pt", "xyz")
    model, _ = checkpoint.load_model(tmp_path / "fc.pt", "abc")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fc.state_dict().values()))
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(CaptionflowError, match="cannot be read"):
        checkpoint.load(tmp_path / "bad.pt")


def _train(data, out, cfg, model="show_attend_tell"):
    xe.train(
        data / "train.h5",
        data / "val.h5",
        data / "labels.h5",
        data / "labels.json",
        data / "references.json",
        out / "model.pt",
        out / "history.tsv",
        model,
        MODEL_ARGS,
        cfg,
    )
    return checkpoint.load(out / "model.pt")


class _Crash(Exception):
    pass


def test_crash_mid_epoch_resumes_to_bit_identical_weights(tiny_data, tmp_path, monkeypatch, capsys):
    cfg = build(XEConfig, epochs=3, batch_size=8, checkpoint_every=3, ss_k=5.0, ss_max=0.5, warmup_steps=2)
    reference = _train(tiny_data, tmp_path / "ref", cfg)
    history = (tmp_path / "ref/history.tsv").read_text().splitlines()
    assert history[0].split("\t") == ["epoch", "step", "train_loss", "val_cider_d", "lr"] and len(history) == 4
    assert list((tmp_path / "ref/tensorboard").iterdir())

    real = smoothed_nll
    calls = {"n": 0}

    def crash_on_step_17(*args):
        calls["n"] += 1
        if calls["n"] == 17:  # epoch 1 of 3 (13 batches per epoch), after the step-15 checkpoint
            raise _Crash
        return real(*args)

    monkeypatch.setattr(xe, "smoothed_nll", crash_on_step_17)
    with pytest.raises(_Crash):
        _train(tiny_data, tmp_path / "run", cfg)
    assert not (tmp_path / "run/model.pt").exists()
    monkeypatch.setattr(xe, "smoothed_nll", real)
    capsys.readouterr()
    resumed = _train(tiny_data, tmp_path / "run", cfg)
    out = capsys.readouterr().out
    assert "resuming from" in out and "epoch 1, batch 2, step 15" in out
    assert reference["model"].keys() == resumed["model"].keys()
    assert all(torch.equal(reference["model"][k], resumed["model"][k]) for k in reference["model"])
    assert (tmp_path / "run/history.tsv").read_text() == (tmp_path / "ref/history.tsv").read_text()
