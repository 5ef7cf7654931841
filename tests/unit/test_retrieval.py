"""Retrieval models (GNA-RNN, dual encoder): training on the demo beats chance and the
image-blind twin, exact resume after a crash (batched scoring vs per pair: test_gna_rnn.py)."""

import pytest
import torch

from captionflow.config import build
from captionflow.data.captions import SplitData
from captionflow.errors import CaptionflowError
from captionflow.evaluation.retrieval import evaluate_retrieval, gallery_fc
from captionflow.features.backbones import Backbone, create_backbone
from captionflow.models import checkpoint
from captionflow.training import retrieval
from captionflow.training.retrieval import RetrievalConfig

BACKBONE = Backbone("resnet18", "none", 0, 64, 0)  # the one that extracted tiny_data's features
ARGS = {"embed_size": 32, "hidden_size": 64, "units": 64, "dropout": 0.1}


def _train(data, out, blind=False, **kw):
    cfg = build(
        RetrievalConfig,
        device="cpu",
        **{"model_args": ARGS, "epochs": 12, "batch_size": 64, "lr": 2e-3, "patience": 12, **kw},
    )
    d = data
    retrieval.train(
        d / "train.h5",
        d / "val.h5",
        d / "labels.h5",
        d / "labels.json",
        out / "model.pt",
        out / "history.tsv",
        cfg,
        blind=blind,
    )
    return evaluate_retrieval(out / "model.pt", d / "test.h5", d / "labels.h5", d / "labels.json")


@pytest.mark.slow
def test_factorised_gna_rnn_beats_chance_and_its_blind_twin_with_the_dual_encoder_beside_it(
    small_demo, tmp_path, report_figure
):
    results = {
        "gna_rnn_factorised": _train(small_demo, tmp_path / "gna", model="gna_rnn_factorised"),
        "gna_rnn_factorised blind": _train(small_demo, tmp_path / "blind", blind=True, model="gna_rnn_factorised"),
        "dual_encoder": _train(
            small_demo, tmp_path / "dual", model="dual_encoder", model_args={"embed_size": 32, "units": 64}
        ),
    }
    chance = 100 / 50  # 50 test images: R@1 of a random ranking, in %
    for name, r in results.items():
        t2i = r["text_to_image"]
        report_figure(
            f"demo retrieval {name}: text-to-image R@1 {t2i['R@1']:.1f} R@5 {t2i['R@5']:.1f} R@10 {t2i['R@10']:.1f} mAP {t2i['mAP']:.1f} (chance R@1 {chance:.0f}); image-to-text R@1 {r['image_to_text']['R@1']:.1f}"
        )
    gna, blind = results["gna_rnn_factorised"]["text_to_image"], results["gna_rnn_factorised blind"]["text_to_image"]
    # measured here: R@1 8.4, R@10 41.2 (chance 2 and 20), blind R@5 0.0 against 25.2
    assert gna["R@1"] > 2 * chance and gna["R@10"] > 1.5 * 10 * chance
    assert gna["R@5"] > blind["R@5"] + 10 and gna["mAP"] > blind["mAP"] + 5


class _Crash(Exception):
    pass


@pytest.mark.parametrize("finetune_after", [-1, 2], ids=["frozen", "end_to_end"])
def test_crash_mid_epoch_resumes_to_identical_weights(tiny_data, tmp_path, monkeypatch, finetune_after):
    # end_to_end: the backbone trains from step 2 on; the crash comes at step 9
    cfg = build(
        RetrievalConfig,
        model_args=ARGS,
        epochs=2,
        batch_size=16,
        checkpoint_every=3,
        device="cpu",
        hard_negatives=True,
        finetune_backbone_after=finetune_after,
        backbone_lr=1e-3,
        freeze_stages=4,
    )
    d = tiny_data

    def run(out):
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
        return checkpoint.load(out / "model.pt")

    reference = run(tmp_path / "ref")
    real, calls = retrieval.caption_tensors, {"n": 0}

    def crash(*args):
        calls["n"] += 1
        if calls["n"] == 10:
            raise _Crash
        return real(*args)

    monkeypatch.setattr(retrieval, "caption_tensors", crash)
    with pytest.raises(_Crash):
        run(tmp_path / "run")
    monkeypatch.setattr(retrieval, "caption_tensors", real)
    resumed = run(tmp_path / "run")
    assert all(torch.equal(reference["model"][k], resumed["model"][k]) for k in reference["model"])
    assert ("backbone" in reference) == (finetune_after >= 0)
    if finetune_after >= 0:  # the backbone trained (so its equality says something)
        initial = create_backbone("resnet18", "none", 0, 64).state_dict()
        assert any(not torch.equal(v, initial[k]) for k, v in reference["backbone"].items())
        assert all(torch.equal(reference["backbone"][k], resumed["backbone"][k]) for k in reference["backbone"])
    assert (tmp_path / "run/history.tsv").read_text() == (tmp_path / "ref/history.tsv").read_text()


def test_end_to_end_gallery_features_come_from_the_images_as_extraction_computes_them(tiny_data, tmp_path):
    # a backbone that never trained (the switch comes after the last step): the gallery
    # computed from the resized images equals the feature file's, up to its storage dtype
    d = tiny_data
    cfg = build(RetrievalConfig, model_args=ARGS, epochs=1, device="cpu", finetune_backbone_after=10_000)
    retrieval.train(
        d / "train.h5",
        d / "val.h5",
        d / "labels.h5",
        d / "labels.json",
        tmp_path / "model.pt",
        tmp_path / "history.tsv",
        cfg,
        manifest=d / "manifest.json",
        backbone=BACKBONE,
    )
    ckpt = checkpoint.load(tmp_path / "model.pt")
    data = SplitData(d / "labels.h5", d / "labels.json", d / "test.h5", "test")
    from_images = gallery_fc(ckpt, data, d / "labels.json", d / "manifest.json", "test", torch.device("cpu"))
    stored = data.features.get(range(len(data.features)))["fc"]
    assert from_images.shape == stored.shape
    assert torch.allclose(from_images, stored, rtol=1e-2, atol=1e-3 * stored.abs().max().item())
    with pytest.raises(CaptionflowError, match="resize manifest"):
        gallery_fc(ckpt, data, d / "labels.json", None, "test", torch.device("cpu"))
