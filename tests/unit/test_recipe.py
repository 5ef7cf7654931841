"""The papers' training recipes (issue 27): optimizers, step / multistep schedules, gradient
accumulation, clipping by value, the stage dropout, AoANet's scheduled sampling, and exact
resume with them. Expected values are computed by hand in the comments."""

import math

import numpy as np
import pytest
import torch

from captionflow.config import build
from captionflow.errors import CaptionflowError
from captionflow.models import checkpoint, create_model
from captionflow.training import self_critical, xe
from captionflow.training.e2e import E2EConfig
from captionflow.training.losses import smoothed_nll
from captionflow.training.recipe import clip_gradients, maybe_compile, set_dropout
from captionflow.training.schedule import LRSchedule, ScheduleConfig
from captionflow.training.scst import SCSTConfig
from captionflow.training.xe import XEConfig, linear_step_prob, ss_prob_of
from captionflow.utils.precision import Precision, make_optimizer

CPU = torch.device("cpu")


def _epoch_lrs(cfg, epochs, steps_per_epoch, lrs=(1.0,)):
    """The learning rate of every group at each optimizer step, epoch by epoch."""
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    opt = torch.optim.SGD(groups)
    schedule = LRSchedule(opt, ScheduleConfig.of(cfg, "xe"), total_steps=epochs * steps_per_epoch)
    seen, step = [], 0
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            seen.append([g["lr"] for g in opt.param_groups])
            opt.step()
            step += 1
            schedule.after_step(step)
        schedule.after_epoch(0.0)
    return seen


def test_step_schedule_after_warmup():
    # 2 steps an epoch, warmup 2 steps: 1/2, then 1; x0.5 at the start of epochs 2 and 4
    cfg = build(XEConfig, lr=1.0, warmup_steps=2, schedule="step", decay_factor=0.5, decay_every=2)
    lrs = [lr for (lr,) in _epoch_lrs(cfg, 5, 2)]
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25])


def test_step_schedule_multiplies_a_warmup_that_outlasts_an_epoch():
    # ExpansionNet v2's annealing: lr x warmup factor x decay; 1 step an epoch, warmup 3 steps,
    # x0.5 every epoch: 1/3 x 1, 2/3 x 0.5, 1 x 0.25, 1 x 0.125
    cfg = build(XEConfig, lr=1.0, warmup_steps=3, schedule="step", decay_factor=0.5, decay_every=1)
    lrs = [lr for (lr,) in _epoch_lrs(cfg, 4, 1)]
    assert lrs == pytest.approx([1 / 3, 1 / 3, 0.25, 0.125])


def test_step_schedule_counts_from_the_decay_start_epoch_like_aoanet():
    # AoANet, at the start of epoch e: e > start: lr x 0.8 ** ((e - start) // every), else lr.
    # start 2, every 3: epochs 0-4 x1, 5-7 x0.8, 8 x0.64
    cfg = build(XEConfig, lr=1.0, warmup_steps=0, schedule="step", decay_factor=0.8, decay_every=3, decay_start_epoch=2)
    lrs = [lr for (lr,) in _epoch_lrs(cfg, 9, 1)]
    assert lrs == pytest.approx([1, 1, 1, 1, 1, 0.8, 0.8, 0.8, 0.64])


def test_multistep_schedule_with_two_parameter_groups():
    # captioner 1.0, backbone 0.1; x0.1 from the start of epochs 1 and 3
    cfg = build(E2EConfig, warmup_steps=0, schedule="multistep", decay_factor=0.1, milestones=[1, 3])
    lrs = _epoch_lrs(cfg, 4, 2, lrs=(1.0, 0.1))
    expected = [[1.0, 0.1]] * 2 + [[0.1, 0.01]] * 4 + [[0.01, 0.001]] * 2
    assert np.allclose(lrs, expected)


def test_step_schedule_resumes_from_its_state():
    cfg = build(XEConfig, lr=1.0, warmup_steps=3, schedule="step", decay_factor=0.5, decay_every=1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))])
    schedule = LRSchedule(opt, ScheduleConfig.of(cfg, "xe"), total_steps=10)
    schedule.after_step(1)
    schedule.after_epoch(0.0)
    schedule.after_epoch(0.0)  # epoch 2, 1 step done: 2/3 x 0.25
    fresh_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    fresh = LRSchedule(fresh_opt, ScheduleConfig.of(cfg, "xe"), total_steps=10)
    fresh.load_state_dict(schedule.state_dict())
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(2 / 3 * 0.25)
    fresh.after_step(2)
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("name", "kind"),
    [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("radam", torch.optim.RAdam), ("sgd", torch.optim.SGD)],
)
def test_each_optimizer_is_built_with_its_settings(name, kind):
    cfg = build(XEConfig, optimizer=name, lr=0.3, weight_decay=0.2, betas=[0.8, 0.98], eps=1e-9, momentum=0.7)
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(2))], CPU, cfg, "xe")
    assert type(opt) is kind
    group = opt.param_groups[0]
    assert group["lr"] == 0.3 and group["weight_decay"] == 0.2
    if name == "sgd":
        assert group["momentum"] == 0.7
    else:
        assert tuple(group["betas"]) == (0.8, 0.98) and group["eps"] == 1e-9


def _steps(cfg, n):
    """w = 1, loss = 2 w: the weight after n optimizer steps."""
    w = torch.nn.Parameter(torch.ones(1))
    opt = make_optimizer([w], CPU, cfg, "xe")
    for _ in range(n):
        opt.zero_grad()
        (2 * w).sum().backward()
        opt.step()
    return w.item()


def test_hand_computed_updates():
    # SGD momentum 0.9, lr 0.1, gradient 2: buffer 2 -> w 0.8; buffer 0.9 x 2 + 2 = 3.8 -> w 0.42
    sgd = build(XEConfig, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.0)
    assert _steps(sgd, 2) == pytest.approx(0.42)
    # Adam's first step: lr x g / (|g| + eps); L2 decay 0.5 adds 0.5 x w: g = 2.5, eps 0.5 -> 1 - 0.1 x 2.5 / 3
    adam = build(XEConfig, optimizer="adam", lr=0.1, weight_decay=0.5, eps=0.5)
    assert _steps(adam, 1) == pytest.approx(1 - 0.1 * 2.5 / 3.0)
    # AdamW decays apart: w (1 - lr wd) - lr g / (|g| + eps) = 0.95 - 0.1 x 2 / 2.5
    adamw = build(XEConfig, optimizer="adamw", lr=0.1, weight_decay=0.5, eps=0.5)
    assert _steps(adamw, 1) == pytest.approx(0.95 - 0.1 * 2 / 2.5)


def test_an_unknown_optimizer_or_clip_mode_is_refused():
    with pytest.raises(CaptionflowError, match="scst.optimizer 'lamb' is not one of adamw, adam, radam, sgd"):
        make_optimizer([torch.nn.Parameter(torch.zeros(1))], CPU, build(SCSTConfig, optimizer="lamb"), "scst")
    with pytest.raises(CaptionflowError, match="e2e.grad_clip_mode 'max' is not one of norm, value"):
        clip_gradients([torch.nn.Parameter(torch.zeros(1))], 1.0, "max", "e2e")


def _with_grads(*grads):
    params = [torch.nn.Parameter(torch.zeros(len(g))) for g in grads]
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g)
    return params


def test_clip_by_value_clamps_each_element_and_reports_the_norm():
    params = _with_grads([3.0, -0.5], [-4.0, 1.0])
    norm = clip_gradients(params, 1.0, "value", "xe")
    assert norm.item() == pytest.approx(math.sqrt(9 + 0.25 + 16 + 1))  # before clipping, for the check
    assert params[0].grad.tolist() == [1.0, -0.5] and params[1].grad.tolist() == [-1.0, 1.0]
    # by norm: the whole gradient scaled to norm 1 (3, 4 -> 0.6, 0.8)
    params = _with_grads([3.0], [4.0])
    assert clip_gradients(params, 1.0, "norm", "xe").item() == pytest.approx(5.0)
    assert params[0].grad.item() == pytest.approx(0.6) and params[1].grad.item() == pytest.approx(0.8)
    # a NaN gradient still reaches the finiteness check
    assert not math.isfinite(clip_gradients(_with_grads([float("nan"), 0.0]), 1.0, "value", "xe").item())


def _dropouts(model):
    ps = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    return ps + [m.dropout for m in model.modules() if type(m).__name__ == "MultiHeadAttention"]


@pytest.mark.parametrize(
    ("name", "args", "own"),
    [
        ("transformer", {"n_heads": 2, "n_layers": 1}, {0.1}),
        # the decoder's AoA has a dropout layer of p = 0 (none in the authors' code)
        ("aoanet", {"n_heads": 2, "refiner_layers": 1, "attn_dropout": 0.1, "aoa_dropout": 0.1}, {0.1, 0.0}),
        ("show_attend_tell", {}, {0.1}),
    ],
)
def test_the_stage_dropout_sets_every_dropout_and_none_keeps_the_models(name, args, own):
    args = {"vocab_size": 11, "feat_dim": 8, "embed_size": 16, "hidden_size": 32, "dropout": 0.1, **args}
    kept = create_model(name, **args)
    set_dropout(kept, None)
    assert _dropouts(kept) and set(_dropouts(kept)) == own
    changed = create_model(name, **args)
    set_dropout(changed, 0.45)
    # every layer with dropout takes the stage's rate; one built without (p = 0) stays off
    assert _dropouts(changed) == [0.45 if q > 0 else 0.0 for q in _dropouts(kept)]
    assert 0.45 in _dropouts(changed)


def test_linear_step_scheduled_sampling_per_epoch():
    # AoANet: at the start of epoch e > start: min(increase x ((e - start) // every), max)
    # start 0, every 5, +0.05, max 0.25 (its defaults): 0 until epoch 4, 0.05 at 5-9, ... 0.25 from 25
    assert [linear_step_prob(e, 0, 5, 0.05, 0.25) for e in (0, 4, 5, 9, 10, 20, 25, 40)] == pytest.approx(
        [0, 0, 0.05, 0.05, 0.1, 0.2, 0.25, 0.25]
    )
    # start 2, every 2, +0.1, max 0.25: epochs 0-3 0, 4-5 0.1, 6-7 0.2, 8 on 0.25
    cfg = build(XEConfig, ss_schedule="linear_step", ss_start=2, ss_every=2, ss_increase=0.1, ss_max=0.25)
    assert [ss_prob_of(cfg, 10**6, e) for e in range(10)] == pytest.approx([0, 0, 0, 0, 0.1, 0.1, 0.2, 0.2, 0.25, 0.25])
    # the default stays today's inverse sigmoid of the step
    assert ss_prob_of(build(XEConfig, ss_k=100.0, ss_max=1.0), 0, 7) == pytest.approx(1 - 100 / 101)


class _Run:
    """What optimizer_step needs of a TrainingRun."""

    step, writer = 0, None

    def check_finite(self, loss, grad_norm=None):
        self.checked = (loss, grad_norm)

    def step_done(self, loss, scalars):
        self.done = (loss, scalars)


def test_self_critical_accumulation_equals_one_batch_twice_as_large():
    # a per-row mean loss: two halves averaged give the gradient of the whole batch
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8)

    def updated(group):
        model = torch.nn.Linear(3, 1)
        torch.nn.init.constant_(model.weight, 0.5)
        torch.nn.init.constant_(model.bias, 0.0)
        cfg = build(SCSTConfig, optimizer="sgd", lr=0.1, weight_decay=0.0, accumulate=len(group))
        opt = make_optimizer(model.parameters(), CPU, cfg, "scst")
        schedule = LRSchedule(opt, ScheduleConfig.of(cfg, "scst"), total_steps=1)

        def loss_of(rows):
            loss = ((model(x[rows]).squeeze(1) - y[rows]) ** 2).mean()
            return loss, y[rows], torch.zeros(len(rows))

        run = _Run()
        self_critical.optimizer_step(run, group, loss_of, model, opt, schedule, Precision("fp32", CPU), cfg, "scst")
        return model.weight.detach().clone(), run.done

    whole, (whole_loss, whole_scalars) = updated([list(range(8))])
    halves, (halves_loss, halves_scalars) = updated([list(range(4)), list(range(4, 8))])
    assert torch.allclose(whole, halves, atol=1e-6) and not torch.allclose(whole, torch.full_like(whole, 0.5))
    assert halves_loss == pytest.approx(whole_loss) and halves_scalars["reward"] == pytest.approx(y.mean().item())


MODEL_ARGS = {"embed_size": 16, "hidden_size": 32}


def _xe(data, out, cfg, model="fc"):
    xe.train(
        data / "train.h5",
        data / "val.h5",
        data / "labels.h5",
        data / "labels.json",
        data / "references.json",
        out / "model.pt",
        out / "history.tsv",
        model,
        {**MODEL_ARGS, "dropout": 0.3},
        cfg,
    )
    return checkpoint.load(out / "model.pt")


def test_xe_accumulation_equals_one_batch_twice_as_large(tiny_data, tmp_path, monkeypatch):
    # 4 captions of one length (equal token counts: the mean over two halves is the mean
    # over all), one optimizer step of SGD, dropout 0 (this stage's override)
    lengths = None

    def batches(size):
        def fake(lens, *args):  # the 4 first captions of the commonest length, in batches of `size`
            nonlocal lengths
            lengths = np.asarray(lens)
            pick = [i for i in range(len(lens)) if lens[i] == np.bincount(lengths).argmax()][:4]
            return [pick[i : i + size] for i in range(0, 4, size)]

        return fake

    cfg = dict(epochs=1, batch_size=4, optimizer="sgd", lr=0.5, weight_decay=0.0, warmup_steps=0, dropout=0.0)
    monkeypatch.setattr(xe, "bucketed_batches", batches(4))
    whole = _xe(tiny_data, tmp_path / "whole", build(XEConfig, **cfg, accumulate=1))
    monkeypatch.setattr(xe, "bucketed_batches", batches(2))
    halves = _xe(tiny_data, tmp_path / "halves", build(XEConfig, **cfg, accumulate=2))
    assert np.bincount(lengths).max() >= 4
    assert all(torch.allclose(whole["model"][k], halves["model"][k], atol=1e-6) for k in whole["model"])
    torch.manual_seed(0)  # xe's seed: the initial weights
    start = dict(create_model("fc", **whole["model_args"]).named_parameters())
    assert any(not torch.equal(start[k], whole["model"][k]) for k in start)  # it did train
    # the stage's dropout is recorded, the model's own stays in model_args (decoding rebuilds it)
    assert halves["xe"]["dropout"] == 0.0 and halves["model_args"]["dropout"] == 0.3
    model, _ = checkpoint.load_model(tmp_path / "halves/model.pt", halves["vocab_hash"])
    assert model.dropout.p == 0.3


class _Crash(Exception):
    pass


def test_xe_with_step_schedule_and_accumulation_resumes_bit_identically(tiny_data, tmp_path, monkeypatch, capsys):
    # 13 batches an epoch in groups of 2: 7 steps; a state every 3 steps
    cfg = build(
        XEConfig,
        epochs=3,
        batch_size=8,
        checkpoint_every=3,
        accumulate=2,
        schedule="step",
        decay_every=1,
        decay_factor=0.5,
        warmup_steps=2,
        grad_clip_mode="value",
        grad_clip=0.05,
        ss_schedule="linear_step",
        ss_every=1,
        ss_increase=0.2,
        optimizer="radam",
    )
    probs, real_prob = [], xe.ss_prob_of
    monkeypatch.setattr(xe, "ss_prob_of", lambda *args: probs.append(real_prob(*args)) or probs[-1])
    reference = _xe(tiny_data, tmp_path / "ref", cfg, "show_attend_tell")
    monkeypatch.setattr(xe, "ss_prob_of", real_prob)
    assert probs == pytest.approx([0.0] * 7 + [0.2] * 7 + [0.25] * 7)  # one per step; + 0.2 an epoch, max 0.25
    history = [line.split("\t") for line in (tmp_path / "ref/history.tsv").read_text().splitlines()]
    assert [row[1] for row in history[1:]] == ["7", "14", "21"]  # optimizer steps, not batches
    assert [float(row[-1]) for row in history[1:]] == pytest.approx([5e-4 * 0.5, 5e-4 * 0.25, 5e-4 * 0.125])

    real = smoothed_nll
    calls = {"n": 0}

    def crash_on_call_19(*args):
        calls["n"] += 1
        if calls["n"] == 19:  # epoch 1, step 10's second batch: after the step-9 state
            raise _Crash
        return real(*args)

    monkeypatch.setattr(xe, "smoothed_nll", crash_on_call_19)
    with pytest.raises(_Crash):
        _xe(tiny_data, tmp_path / "run", cfg, "show_attend_tell")
    monkeypatch.setattr(xe, "smoothed_nll", real)
    capsys.readouterr()
    resumed = _xe(tiny_data, tmp_path / "run", cfg, "show_attend_tell")
    assert "epoch 1, batch 2, step 9" in capsys.readouterr().out
    assert all(torch.equal(reference["model"][k], resumed["model"][k]) for k in reference["model"])
    assert (tmp_path / "run/history.tsv").read_text() == (tmp_path / "ref/history.tsv").read_text()


def test_end_to_end_regimes_train_with_a_recipe(tiny_data, tmp_path):
    # finetune_e2e and train_scst_e2e (which inherits every scst key) with the new keys: both
    # parameter groups follow the step schedule from their own learning rates
    from captionflow.features.backbones import Backbone
    from captionflow.metrics.cider import document_frequencies_from_labels
    from captionflow.training import e2e, scst_e2e
    from captionflow.training.scst_e2e import SCSTE2EConfig

    d = tiny_data
    xe_cfg = build(XEConfig, epochs=1, batch_size=8)
    xe.train(*(d / f for f in ("train.h5", "val.h5", "labels.h5", "labels.json", "references.json")),
             tmp_path / "xe.pt", tmp_path / "xe.tsv", "fc", {**MODEL_ARGS, "dropout": 0.3}, xe_cfg)  # fmt: skip
    backbone = Backbone("resnet18", "none", 0, 64, 0)  # the one that extracted tiny_data's features
    recipe = dict(optimizer="radam", schedule="step", decay_every=1, decay_factor=0.5, warmup_steps=0)
    recipe.update(grad_clip_mode="value", grad_clip=0.1, dropout=0.0, freeze_stages=4, epochs=2, batch_size=10)
    e2e_cfg = build(E2EConfig, **recipe, lr=1e-3, backbone_lr=1e-4, augment=False)
    e2e.train(d / "labels.h5", d / "labels.json", d / "references.json", d / "manifest.json", tmp_path / "xe.pt",
              tmp_path / "e2e.pt", tmp_path / "e2e.pth", tmp_path / "e2e.tsv", backbone, e2e_cfg)  # fmt: skip
    document_frequencies_from_labels(d / "labels.h5", d / "labels.json").save(tmp_path / "df.npz")
    cfg = build(SCSTE2EConfig, **recipe, lr=1e-3, backbone_lr=1e-4, accumulate=2, samples=2)
    scst_e2e.train(d / "labels.h5", d / "labels.json", d / "references.json", tmp_path / "df.npz",
                   d / "manifest.json", tmp_path / "e2e.pt", tmp_path / "e2e.pth", tmp_path / "out.pt",
                   tmp_path / "out.pth", tmp_path / "out.tsv", tmp_path / "reward.txt", backbone, cfg)  # fmt: skip
    for tsv in ("e2e.tsv", "out.tsv"):  # the history's lr is the first group's: the backbone's 1e-4
        rows = [line.split("\t") for line in (tmp_path / tsv).read_text().splitlines()[1:]]
        # 20 images in batches of 10: 2 steps an epoch (e2e), 1 with accumulate 2 (scst_e2e)
        assert [float(r[4]) for r in rows] == pytest.approx([1e-4 * 0.5, 1e-4 * 0.25]), tsv
    assert [r.split("\t")[1] for r in (tmp_path / "out.tsv").read_text().splitlines()[1:]] == ["1", "2"]
    out = checkpoint.load(tmp_path / "out.pt")
    assert out["scst_e2e"]["accumulate"] == 2 and out["model_args"]["dropout"] == 0.3


def test_maybe_compile_is_the_module_itself_when_off():
    model = torch.nn.Linear(2, 2)
    assert maybe_compile(model, False) is model
    compiled = maybe_compile(model, True)
    assert compiled is not model and compiled._orig_mod is model  # shares the parameters


@pytest.mark.slow  # inductor compiles on the CPU: ~40 s on the 2-core development machine
@pytest.mark.timeout(600)
def test_xe_with_compile_matches_eager_and_writes_a_plain_checkpoint(tiny_data, tmp_path):
    """xe.compile true: the same per-epoch losses as false within 1e-4 relative (inductor
    fuses and reorders float32 sums), weights within 1e-3, and a checkpoint with the same
    keys (no `_orig_mod.`) that a plain model loads. One batch of all 100 captions per epoch: one shape, one compile."""
    args = {"embed_size": 16, "hidden_size": 32, "n_layers": 1, "n_heads": 2, "dropout": 0.0}

    def run(compile_, out):
        cfg = build(XEConfig, epochs=2, batch_size=100, warmup_steps=0, device="cpu", compile=compile_)
        xe.train(
            tiny_data / "train.h5",
            tiny_data / "val.h5",
            tiny_data / "labels.h5",
            tiny_data / "labels.json",
            tiny_data / "references.json",
            out / "model.pt",
            out / "history.tsv",
            "transformer",
            args,
            cfg,
        )
        losses = [float(line.split("\t")[2]) for line in (out / "history.tsv").read_text().splitlines()[1:]]
        return checkpoint.load(out / "model.pt"), losses

    eager, eager_losses = run(False, tmp_path / "eager")
    torch._dynamo.utils.counters.clear()
    compiled, compiled_losses = run(True, tmp_path / "compiled")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the forward did go through dynamo
    assert len(eager_losses) == 2 and compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    assert eager_losses[1] != pytest.approx(eager_losses[0], rel=1e-4)  # the model trained: epochs differ
    assert list(compiled["model"]) == list(eager["model"])
    # Adam moves a weight by about lr a step whatever the gradient's size, so a gradient near 0
    # that rounds differently may move it by up to 2 x lr (5e-4) more over the two steps
    for k in eager["model"]:
        torch.testing.assert_close(compiled["model"][k], eager["model"][k], rtol=0, atol=1e-3)
    plain = create_model("transformer", **compiled["model_args"])
    plain.load_state_dict(compiled["model"])  # strict: a checkpoint written with compile loads without it
