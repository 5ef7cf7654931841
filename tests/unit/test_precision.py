"""Mixed precision (`precision: bf16`) on the CPU: the XE loss and the SCST objective of
every model come within a stated tolerance of float32, log-probabilities stay float32,
whole XE and SCST stages run under it, and fp16 off CUDA is one line."""

import math

import pytest
import torch

from captionflow.config import build
from captionflow.data.captions import SplitData
from captionflow.decoding.search import sample
from captionflow.errors import CaptionflowError
from captionflow.metrics.cider import document_frequencies_from_labels
from captionflow.models import checkpoint, create_model
from captionflow.models.registry import MODELS
from captionflow.training import scst, xe
from captionflow.training.losses import smoothed_nll
from captionflow.training.scst import SCSTConfig
from captionflow.training.xe import XEConfig
from captionflow.utils.precision import Precision

CPU = torch.device("cpu")
# bf16 keeps 8 bits of mantissa: products in it are good to ~0.4 %; the losses, sums of
# float32 log-probabilities, within 2 % of float32 (measured: the XE loss 0.03 % at most)
TOLERANCE = 0.02


def _model(name, data):
    torch.manual_seed(0)
    args = {"embed_size": 32, "hidden_size": 32}
    if name == "show_attend_tell":
        args["att_size"] = 32
    model = create_model(name, vocab_size=data.vocab_size, feat_dim=data.features.feat_dim, **args)
    model.fit_feature_norms(data.features.get(range(len(data.features))))
    return model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bf16_xe_loss_and_scst_objective_are_within_tolerance_of_fp32(tiny_data, name):
    d = tiny_data
    data = SplitData(d / "labels.h5", d / "labels.json", d / "train.h5", "train")
    model = _model(name, data).eval()  # no dropout: the same function in both precisions
    feats, inputs, targets, mask = data.caption_batch(list(range(16)))
    bf16 = Precision("bf16", CPU)

    def xe_loss(precision):
        with precision.autocast():
            logprobs, aux = model.teacher_forcing(feats, inputs)
        assert logprobs.dtype == torch.float32  # the models' log-softmax is float32 under autocast
        return smoothed_nll(logprobs, targets, mask, 0.1) + model.aux_loss(aux, mask)

    fp32_loss, bf16_loss = xe_loss(Precision("fp32", CPU)), xe_loss(bf16)
    assert math.isfinite(bf16_loss.item()) and abs(bf16_loss.item() - fp32_loss.item()) <= TOLERANCE * abs(
        fp32_loss.item()
    )

    # SCST's objective on the same sampled captions: sum of token log-probs x advantage
    seqs, lp32 = sample(model, feats, n=1, max_len=8, generator=torch.Generator().manual_seed(0))
    with bf16.autocast():
        seqs16, lp16 = sample(model, feats, n=1, max_len=8, generator=torch.Generator().manual_seed(0))
    same = (seqs == seqs16).all(dim=1)  # rows where bf16 drew the same words
    assert same.float().mean() >= 0.5
    advantage = torch.linspace(-1, 1, len(seqs))[same]
    objective32 = (advantage * lp32[same].sum(dim=1)).mean()
    objective16 = (advantage * lp16[same].float().sum(dim=1)).mean()
    assert abs(objective16 - objective32) <= TOLERANCE * lp32[same].sum(dim=1).abs().mean()


def test_xe_and_scst_stages_run_under_bf16_near_their_fp32_losses(tiny_data, tmp_path):
    d = tiny_data
    args = {"embed_size": 16, "hidden_size": 32, "att_size": 16, "dropout": 0.0}
    losses = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        cfg = build(XEConfig, epochs=1, batch_size=8, warmup_steps=2, precision=precision)
        xe.train(
            d / "train.h5",
            d / "val.h5",
            d / "labels.h5",
            d / "labels.json",
            d / "references.json",
            out / "model.pt",
            out / "history.tsv",
            "show_attend_tell",
            args,
            cfg,
        )
        losses[precision] = float((out / "history.tsv").read_text().splitlines()[1].split("\t")[2])
    assert abs(losses["bf16"] - losses["fp32"]) <= TOLERANCE * losses["fp32"], losses
    assert losses["bf16"] != losses["fp32"]  # autocast really ran: bf16 rounds differently

    document_frequencies_from_labels(d / "labels.h5", d / "labels.json").save(tmp_path / "df.npz")
    out = tmp_path / "scst"
    cfg = build(SCSTConfig, epochs=1, batch_size=5, samples=2, precision="bf16")
    scst.train(
        d / "train.h5",
        d / "val.h5",
        d / "labels.h5",
        d / "labels.json",
        d / "references.json",
        tmp_path / "df.npz",
        tmp_path / "bf16/model.pt",
        out / "model.pt",
        out / "history.tsv",
        out / "reward.txt",
        cfg,
    )
    ckpt = checkpoint.load(out / "model.pt")
    assert ckpt["scst"]["precision"] == "bf16" and all(
        torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point()
    )


def test_fp16_needs_cuda_and_an_unknown_precision_is_refused():
    with pytest.raises(CaptionflowError, match="xe.precision fp16 needs a CUDA device"):
        Precision("fp16", CPU, "xe.precision")
    with pytest.raises(CaptionflowError, match="'fp8' is not one of fp32, bf16, fp16"):
        Precision("fp8", CPU)
    assert not Precision("bf16", CPU).scaler.is_enabled()  # loss scaling is fp16's only
