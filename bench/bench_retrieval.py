"""Retrieval on the demo: GNA-RNN as published (`gna_rnn`), its factorised variant
(`gna_rnn_factorised`) and the dual encoder, each trained with the demo's retrieval settings
(config.yaml's show_attend_tell experiment) beside its image-blind twin (zeroed image
features); prints text-to-image R@1/5/10 and mAP on the test split, gallery scoring pairs/s
(every test caption against every test image, score_split), and each figure's ratio to the
factorised model measured in the same run. With --speed also the older figures: batched
scoring vs a per-pair loop, and training steps/s on frozen features vs end to end.

    .venv/bin/python bench/bench_retrieval.py [--workdir DIR] [--models gna_rnn,...] [--speed]

Needs the demo's features and labels (`make demo`, or its data and feature stages) in the
working directory.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import yaml

from captionflow.config import build
from captionflow.data.captions import SplitData
from captionflow.evaluation.retrieval import caption_tensors, evaluate_retrieval, load_retrieval, score_split
from captionflow.metrics.retrieval import both_directions
from captionflow.models.retrieval import create_retrieval_model
from captionflow.training import retrieval
from captionflow.training.retrieval import RetrievalConfig

MODELS = ("gna_rnn", "gna_rnn_factorised", "dual_encoder")


def demo_settings():
    """The demo experiment's retrieval section (config.yaml), less its model name."""
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
    section = dict(config["experiments"]["show_attend_tell"]["retrieval"])
    section.pop("model")
    return section


def train_and_score(name, settings, features, data, blind, threads, repeats=3):
    """-> (test text-to-image metrics, gallery scoring pairs/s) of `name` trained with `settings`."""
    args = dict(settings.get("model_args", {}))
    if name == "dual_encoder":
        args.pop("hidden_size", None)
    cfg = build(RetrievalConfig, **{**settings, "model": name, "model_args": args, "device": "cpu"})
    with tempfile.TemporaryDirectory() as tmp:
        model_pt = Path(tmp) / "model.pt"
        retrieval.train(
            features / "train.h5",
            features / "val.h5",
            data / "labels.h5",
            data / "labels.json",
            model_pt,
            Path(tmp) / "history.tsv",
            cfg,
            blind=blind,
            threads=threads,
        )
        metrics = evaluate_retrieval(model_pt, features / "test.h5", data / "labels.h5", data / "labels.json")
        model, _ = load_retrieval(model_pt)
    test = SplitData(data / "labels.h5", data / "labels.json", features / "test.h5", "test", blind)
    score_split(model, test, torch.device("cpu"))  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        score_split(model, test, torch.device("cpu"))
    seconds = (time.perf_counter() - start) / repeats
    return metrics["text_to_image"], len(test.caption_rows) * len(test.features) / seconds


def compare(features, data, models, threads, epochs=0):
    settings = demo_settings()
    if epochs:
        settings.update(epochs=epochs, patience=epochs)
    print(f"demo retrieval, settings of config.yaml's show_attend_tell: {settings}; {threads} threads", flush=True)
    rows = {}
    for name in models:
        for blind in (False, True):
            label = f"{name}{' blind' if blind else ''}"
            start = time.perf_counter()
            rows[label] = (
                *train_and_score(name, settings, features, data, blind, threads),
                time.perf_counter() - start,
            )
            print(f"  trained {label} in {rows[label][2]:.0f} s", flush=True)
    base = rows.get("gna_rnn_factorised")
    print(
        f"{'model':26s} {'R@1':>6s} {'R@5':>6s} {'R@10':>6s} {'mAP':>6s} {'pairs/s':>12s}  ratio to gna_rnn_factorised"
    )
    for label, (t2i, rate, _) in rows.items():
        ratio = ""
        if base is not None:
            b = base[0]
            ratio = (
                f"R@1 x{t2i['R@1'] / max(b['R@1'], 1e-9):.2f} mAP x{t2i['mAP'] / max(b['mAP'], 1e-9):.2f} "
                f"speed x{rate / base[1]:.4f}"
            )
        print(
            f"{label:26s} {t2i['R@1']:6.1f} {t2i['R@5']:6.1f} {t2i['R@10']:6.1f} {t2i['mAP']:6.1f} {rate:12,.0f}  {ratio}"
        )
    for name in models:
        if name in rows and f"{name} blind" in rows:
            seen, blind = rows[name][0], rows[f"{name} blind"][0]
            verdict = "beats" if seen["mAP"] > blind["mAP"] and seen["R@5"] > blind["R@5"] else "does NOT beat"
            print(f"  {name} {verdict} its blind twin (mAP {seen['mAP']:.1f} vs {blind['mAP']:.1f})")


def speed(features, data, root, pairs_looped):
    """Batched scoring vs a per-pair loop, and training steps/s frozen vs end to end (factorised)."""
    test = SplitData(data / "labels.h5", data / "labels.json", features / "test.h5", "test")
    torch.manual_seed(0)
    args = {"embed_size": 64, "hidden_size": 128, "units": 128}
    model = create_retrieval_model(
        "gna_rnn_factorised", vocab_size=test.vocab_size, feat_dim=test.features.feat_dim, **args
    ).eval()
    n_text, n_img = len(test.caption_rows), len(test.features)
    start = time.perf_counter()
    scores, rows = score_split(model, test, torch.device("cpu"))
    batched = time.perf_counter() - start
    start = time.perf_counter()
    both_directions(scores, rows, torch.arange(n_img))
    metric_s = time.perf_counter() - start
    fc = test.features.get(range(n_img))["fc"]
    start = time.perf_counter()
    with torch.no_grad():
        for k in range(pairs_looped):
            t, i = k % n_text, (k * 7) % n_img
            tokens, lengths, _ = caption_tensors(test, [t])
            model(tokens, lengths, fc[i : i + 1])
    loop = (time.perf_counter() - start) / pairs_looped
    pairs = n_text * n_img
    print(f"demo test split: {n_text} captions x {n_img} images = {pairs} pairs, gna_rnn_factorised (units 128)")
    print(
        f"  batched scoring: {pairs / batched:,.0f} pairs/s ({batched * 1000:.0f} ms); per-pair loop: {1 / loop:,.0f} pairs/s; ratio {loop * pairs / batched:,.0f}x"
    )
    print(f"  R@1/5/10 + mAP, both directions: {metric_s * 1000:.0f} ms")
    base = dict(model="gna_rnn_factorised", model_args=args, epochs=1, patience=1, device="cpu")
    rates = {}
    for name, extra in (("frozen features", {}), ("end to end", {"finetune_backbone_after": 0})):
        cfg = build(RetrievalConfig, **base, **extra)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            retrieval.train(
                features / "train.h5",
                features / "val.h5",
                data / "labels.h5",
                data / "labels.json",
                Path(tmp) / "m.pt",
                Path(tmp) / "h.tsv",
                cfg,
                threads=torch.get_num_threads(),
                manifest=data / "resize_manifest.json",
                backbone=features.name,
            )
            seconds = time.perf_counter() - start
            steps = int((Path(tmp) / "h.tsv").read_text().splitlines()[-1].split("\t")[1])
        rates[name] = steps / seconds
        print(
            f"  training, {name}: {rates[name]:.2f} steps/s ({steps} steps of batch {cfg.batch_size}, neg_time {cfg.neg_time}, one epoch incl. validation)"
        )
    print(f"  end to end / frozen: {rates['end to end'] / rates['frozen features']:.3f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=".")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated retrieval models to train")
    p.add_argument("--epochs", type=int, default=0, help="train every model this many epochs (0: the demo's)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--speed", action="store_true", help="also batched vs per-pair scoring and end-to-end training")
    p.add_argument("--pairs", type=int, default=2000, help="--speed: pairs scored one by one (the loop is slow)")
    args = p.parse_args()
    root = Path(args.workdir)
    features = sorted((root / "results/features").iterdir())[0]
    data = root / "results/data"
    torch.set_num_threads(args.threads)
    compare(features, data, [m for m in args.models.split(",") if m], args.threads, args.epochs)
    if args.speed:
        speed(features, data, root, args.pairs)


if __name__ == "__main__":
    main()
