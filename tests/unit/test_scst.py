"""train_scst: rewards, baselines, signature, and exact resume after a crash mid-epoch."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from captionflow.config import build
from captionflow.errors import CaptionflowError
from captionflow.metrics.cider import document_frequencies, document_frequencies_from_labels
from captionflow.models import checkpoint
from captionflow.training import scst, self_critical, xe
from captionflow.training.scst import SCSTConfig
from captionflow.training.xe import XEConfig

MODEL_ARGS = {"embed_size": 16, "hidden_size": 32, "att_size": 16, "dropout": 0.2}


@pytest.fixture(scope="module")
def xe_checkpoint(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("xe")
    d = tiny_data
    cfg = build(XEConfig, epochs=2, batch_size=8)
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
        cfg,
    )
    document_frequencies_from_labels(d / "labels.h5", d / "labels.json").save(out / "df.npz")
    return out


def _scst(data, init, out, cfg):
    d = data
    scst.train(
        d / "train.h5",
        d / "val.h5",
        d / "labels.h5",
        d / "labels.json",
        d / "references.json",
        init / "df.npz",
        init / "model.pt",
        out / "model.pt",
        out / "history.tsv",
        out / "reward.txt",
        cfg,
    )
    return checkpoint.load(out / "model.pt")


class _Crash(Exception):
    pass


# 7 batches per epoch: 7 optimizer steps, or 4 with accumulate 2 (+ the step schedule, the issue-27
# recipe); (settings, steps per epoch, the sampling call that crashes, where the rerun resumes):
# the 10th is epoch 1's 3rd batch, after the step-8 state; the 12th is epoch 1's 5th batch, after
# the step-6 state (steps 5 and 6: batches 8-9 and 10-11)
RECIPES = {
    "default": ({}, 7, 10, "epoch 1, batch 1, step 8"),
    "accumulate_step": ({"accumulate": 2, "schedule": "step", "decay_every": 1}, 4, 12, "epoch 1, batch 2, step 6"),
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_crash_mid_epoch_resumes_to_identical_weights(tiny_data, xe_checkpoint, tmp_path, monkeypatch, capsys, recipe):
    extra, steps, crash_call, resumed_at = RECIPES[recipe]
    cfg = build(SCSTConfig, epochs=2, batch_size=3, samples=3, checkpoint_every=2, lr=1e-4, **extra)
    reference = _scst(tiny_data, xe_checkpoint, tmp_path / "ref", cfg)
    assert reference["stage"] == "scst" and "baseline=mean_of_others; samples=3" in reference["reward_signature"]
    signature = (tmp_path / "ref/reward.txt").read_text()
    assert signature.startswith(
        "STANDARD_wInit+Cider-D[n4,s6.0]+average[nspi3]+1.0.2; reward=CIDEr-D; end token scored"
    )
    assert "cider: n=4 sigma=6" in signature and "df=training corpus (20 images" in signature

    real = self_critical.sample
    calls = {"n": 0}

    def crash(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == crash_call:
            raise _Crash
        return real(*args, **kwargs)

    monkeypatch.setattr(self_critical, "sample", crash)
    with pytest.raises(_Crash):
        _scst(tiny_data, xe_checkpoint, tmp_path / "run", cfg)
    monkeypatch.setattr(self_critical, "sample", real)
    capsys.readouterr()
    resumed = _scst(tiny_data, xe_checkpoint, tmp_path / "run", cfg)
    assert f"resuming from {tmp_path / 'run'}/state/last.pt: {resumed_at}" in capsys.readouterr().out
    assert all(torch.equal(reference["model"][k], resumed["model"][k]) for k in reference["model"])
    assert (tmp_path / "run/history.tsv").read_text() == (tmp_path / "ref/history.tsv").read_text()
    # the epoch means of reward and baseline (the report's SCST curves), resumed with the
    # rest: the mean of the leave-one-out baselines is the mean reward itself
    rows = [line.split("\t") for line in (tmp_path / "ref/history.tsv").read_text().splitlines()]
    assert rows[0][-2:] == ["reward", "baseline"] and len(rows) == 3
    assert all(float(r[-2]) > 0 and float(r[-1]) == pytest.approx(float(r[-2]), abs=1e-5) for r in rows[1:])
    events = EventAccumulator(str(tmp_path / "ref/tensorboard"))
    events.Reload()
    per_step = [e.value for e in events.Scalars("train/reward")]
    assert len(per_step) == 2 * steps
    assert [float(r[-2]) for r in rows[1:]] == pytest.approx(
        [np.mean(per_step[:steps]), np.mean(per_step[steps:])], abs=1e-5
    )


def test_greedy_baseline_and_bleu_mix_train(tiny_data, xe_checkpoint, tmp_path):
    cfg = build(SCSTConfig, epochs=1, batch_size=10, samples=2, baseline="greedy", bleu_weight=0.5)
    out = _scst(tiny_data, xe_checkpoint, tmp_path, cfg)
    assert (
        "reward=0.5 x CIDEr-D + 0.5 x BLEU-4" in out["reward_signature"]
        and "baseline=greedy" in out["reward_signature"]
    )


def test_bad_baseline_is_refused(tiny_data, xe_checkpoint, tmp_path):
    with pytest.raises(CaptionflowError, match="scst.baseline 'average' is not one of greedy, mean_of_others"):
        _scst(tiny_data, xe_checkpoint, tmp_path, build(SCSTConfig, baseline="average"))


# Two training images, one reference each: "a man" and "a dog" (ids: a 1, man 2, dog 5).
REFS = [[1, 2], [1, 5]]


def _reward(tmp_path, eos_mode, end_token=True):
    """The SCST Reward over REFS, its df file written as prepro_cider_df writes one
    (end_token=False: as one written before eos_mode existed)."""
    df = document_frequencies([[r] for r in REFS], end_token=end_token)
    df.save(tmp_path / "df.npz")
    width = max(map(len, REFS)) + 1
    labels = np.array([r + [0] * (width - len(r)) for r in REFS])
    data = SimpleNamespace(caption_image=np.arange(len(REFS)), caption_rows=np.arange(len(REFS)), labels=labels)
    return self_critical.Reward(data, tmp_path / "df.npz", 0.0, torch.device("cpu"), eos_mode)


def test_standard_mode_scores_the_end_token_and_no_eos_does_not(tmp_path):
    ended = torch.tensor([[1, 2, 0]])  # "a man", then the end token
    cut = torch.tensor([[1, 2]])  # "a man", cut off at max_len 2: no end token
    # no_eos, by hand: idf(a) = log 2 - log 2 = 0, idf(man) = idf(a man) = log 2. The
    # hypothesis equals the reference: cosine 1 for unigrams and bigrams, no 3- or 4-grams,
    # same length: 10 x (1 + 1 + 0 + 0) / 4, ended or not.
    no_eos = _reward(tmp_path, "no_eos")
    assert no_eos([0], ended).item() == pytest.approx(5.0) and no_eos([0], cut).item() == pytest.approx(5.0)
    # standard: the reference is "a man E", idf(E) = 0 (every image has it), every n-gram
    # with man or E log 2. Ended, "a man E" equals it: 1-, 2- and 3-gram cosines 1 -> 7.5.
    # Cut, "a man": unigrams 1; bigrams {a man} against {a man, man E}: 1 / sqrt 2; no
    # trigram; length (bigram count) 1 against 2: penalty exp(-1 / (2 x 6^2)).
    standard = _reward(tmp_path, "standard")
    assert standard([0], ended).item() == pytest.approx(7.5)
    assert standard([0], cut).item() == pytest.approx(10 * math.exp(-1 / 72) * (1 + 2**-0.5) / 4)
    # stopping too early: "a E" against "a man E". Unigrams {a, E}: idf 0, zero norm: 0;
    # bigram (a, E) is in no reference: 0.
    assert standard([0], torch.tensor([[1, 0, 0]])).item() == pytest.approx(0.0)


def test_standard_mode_refuses_a_df_counted_without_the_end_token(tmp_path):
    with pytest.raises(CaptionflowError, match="counts no end token .* delete it and rerun"):
        _reward(tmp_path, "standard", end_token=False)
    assert _reward(tmp_path, "no_eos", end_token=False)([0], torch.tensor([[1, 2, 0]])).item() == pytest.approx(5.0)


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({}, "STANDARD_wInit+Cider-D[n4,s6.0]+average[nspi5]+1.0.2"),
        ({"eos_mode": "no_eos"}, "NO<EOS>_wInit+Cider-D[n4,s6.0]+average[nspi5]+1.0.2"),
        ({"baseline": "greedy", "samples": 3}, "STANDARD_wInit+Cider-D[n4,s6.0]+greedy[nspi3]+1.0.2"),
        ({"eos_mode": "no_eos", "baseline": "greedy"}, "NO<EOS>_wInit+Cider-D[n4,s6.0]+greedy[nspi5]+1.0.2"),
        ({"bleu_weight": 0.25}, "STANDARD_wInit+Cider-D[n4,s6.0,w0.75]&BLEU[n4,w0.25]+average[nspi5]+1.0.2"),
        ({"bleu_weight": 1.0, "baseline": "greedy"}, "STANDARD_w/oInit+BLEU[n4]+greedy[nspi5]+1.0.2"),
    ],
)
def test_sacreeos_signature(settings, expected, tmp_path):
    cfg = build(SCSTConfig, **settings)
    assert self_critical.sacreeos_signature(cfg) == expected
    df = document_frequencies([[r] for r in REFS], end_token=True)
    line = self_critical.reward_signature(cfg, tmp_path / "df.npz", df, "abc", 16)
    assert line.startswith(expected + "; reward=") and "\n" not in line
    assert ("end token scored" in line) == (cfg.eos_mode == "standard")
