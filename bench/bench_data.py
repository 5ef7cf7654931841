"""Benchmark the data half: resize images/s, and feature extraction against the bare forward.

    python bench/bench_data.py [--images 256] [--backbone resnet18] [--size 224]

Prints resize throughput (1 and N processes) on COCO-sized JPEGs (640x480), then
extract_features throughput (DataLoader + forward + HDF5 writes, as the rule runs it)
against the backbone forward alone on the same batches already in memory, measured in
the same run. Goal: extraction >= 90% of the bare forward (loading hides behind compute).
"""

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from captionflow.config import build
from captionflow.data.demo import make_scene, render_scene
from captionflow.data.labels import prepro_labels
from captionflow.data.resize import resize_images
from captionflow.features.backbones import Backbone
from captionflow.features.extract import FeatureConfig, ImageFiles, extract_features, split_images


def make_coco_like(root, n):
    """n 640x480 JPEGs (demo scenes, stretched) and a Karpathy caption file."""
    (root / "images").mkdir(parents=True)
    images = []
    for i in range(n):
        img = render_scene(make_scene(random.Random(i)), 480, np.random.default_rng(i)).resize((640, 480))
        img.save(root / "images" / f"{i}.jpg", quality=90)
        images.append(
            {
                "filepath": "images",
                "filename": f"{i}.jpg",
                "imgid": i,
                "split": "train",
                "sentences": [{"tokens": ["x"]}],
            }
        )
    (root / "captions.json").write_text(json.dumps({"images": images}))


def bench_resize(root, size, threads):
    out = root / f"resize{threads}"
    t = time.perf_counter()
    resize_images(
        root / "captions.json", root, out, out / "manifest.json", out / "skipped.tsv", size, "crop", 95, "fail", threads
    )
    return time.perf_counter() - t, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.images
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_coco_like(root, n)
        print(f"{n} images of 640x480 -> {args.size}x{args.size}; backbone {args.backbone}; {args.threads} threads")
        secs1, _ = bench_resize(root, args.size, 1)
        secsn, out = bench_resize(root, args.size, args.threads)
        print(f"resize_images   1 process : {n / secs1:8.1f} img/s")
        print(f"resize_images {args.threads:>2} processes: {n / secsn:8.1f} img/s  ({secs1 / secsn:.2f}x)")

        prepro_labels(
            root / "captions.json",
            out / "skipped.tsv",
            root / "labels.h5",
            root / "labels.json",
            root / "references.json",
            16,
            0,
            True,
        )
        cfg = build(FeatureConfig, batch_size=args.batch_size, num_workers=args.workers, device="cpu")
        backbone = Backbone(args.backbone, "none", 0, args.size, 0)

        # Bare forward on the same batches, decoded beforehand.
        splits, size = split_images(root / "labels.json", out / "manifest.json")
        files = ImageFiles(splits["train"][1], size)
        images = torch.stack([files[i] for i in range(len(files))])
        model = backbone.build().eval()

        def bare():
            with torch.no_grad():
                for b in range(0, n, args.batch_size):
                    model(images[b : b + args.batch_size])

        def full():
            out_h5 = root / "train.h5"
            out_h5.unlink(missing_ok=True)
            extract_features(
                root / "labels.json", out / "manifest.json", {"train": out_h5}, backbone, cfg, threads=args.threads
            )

        bare()  # warm-up
        # Alternate the two, best of `repeats` each: this machine's speed drifts by +-20%.
        times = {"bare": [], "full": []}
        for _ in range(args.repeats):
            for name, fn in (("bare", bare), ("full", full)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        b, f = min(times["bare"]), min(times["full"])
        print(f"backbone forward alone : {n / b:8.1f} img/s (best of {args.repeats})")
        print(f"extract_features       : {n / f:8.1f} img/s (best of {args.repeats}; DataLoader + forward + HDF5)")
        print(f"ratio                  : {b / f:8.1%} of the bare forward (goal >= 90%)")


if __name__ == "__main__":
    main()
