"""Retrieval on the demo: scoring N captions x M images batched vs a per-pair loop, the
metrics' cost, and training steps/s on frozen features vs end to end (the backbone
fine-tuned from the resized images from the first step).

    .venv/bin/python bench/bench_retrieval.py [--workdir DIR]

Needs a finished `make demo` (its features and labels) in the working directory.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from captionflow.config import build
from captionflow.data.captions import SplitData
from captionflow.evaluation.retrieval import caption_tensors, score_split
from captionflow.metrics.retrieval import both_directions
from captionflow.models.retrieval import create_retrieval_model
from captionflow.training import retrieval
from captionflow.training.retrieval import RetrievalConfig


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=".")
    p.add_argument("--pairs", type=int, default=2000, help="pairs scored one by one (the loop is slow)")
    args = p.parse_args()
    root = Path(args.workdir)
    features = sorted((root / "results/features").iterdir())[0]
    data = root / "results/data"
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    test = SplitData(data / "labels.h5", data / "labels.json", features / "test.h5", "test")
    torch.manual_seed(0)
    model = create_retrieval_model(
        "gna_rnn",
        vocab_size=test.vocab_size,
        feat_dim=test.features.feat_dim,
        embed_size=64,
        hidden_size=128,
        units=128,
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
        for k in range(args.pairs):
            t, i = k % n_text, (k * 7) % n_img
            tokens, lengths, _ = caption_tensors(test, [t])
            model(tokens, lengths, fc[i : i + 1])
    loop = (time.perf_counter() - start) / args.pairs
    pairs = n_text * n_img
    print(
        f"demo test split: {n_text} captions x {n_img} images = {pairs} pairs, gna_rnn (units 128), {torch.get_num_threads()} threads"
    )
    print(
        f"  batched scoring: {pairs / batched:,.0f} pairs/s ({batched * 1000:.0f} ms); per-pair loop: {1 / loop:,.0f} pairs/s; ratio {loop * pairs / batched:,.0f}x"
    )
    print(f"  R@1/5/10 + mAP, both directions: {metric_s * 1000:.0f} ms")
    base = dict(model_args={"embed_size": 64, "hidden_size": 128, "units": 128}, epochs=1, patience=1, device="cpu")
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


if __name__ == "__main__":
    main()
