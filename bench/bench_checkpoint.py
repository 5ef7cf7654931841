"""Checkpoint cost per training hour at COCO size: states every N steps vs every M minutes,
written on the training thread vs off it (what TrainingRun does: copy, then a writer thread).

    .venv/bin/python bench/bench_checkpoint.py [--steps-per-hour 141600] [--every 50] [--minutes 30]

The state is paper-size ExpansionNet v2 (presets/expansionnet_v2_coco.yaml, vocabulary
10,000, 1536-d Swin-L features) with its AdamW moments, written the way TrainingRun writes
it. steps-per-hour defaults to the issue's COCO XE figure: one epoch of 113,287 x 5
captions at batch 48 (11,800 steps) in ~5 minutes of GPU time. The seconds a save costs the
training thread are measured here; writing to a cluster's file system may be slower.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
import yaml

from captionflow.models import create_model
from captionflow.training.loop import TrainingRun

ROOT = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps-per-hour", type=float, default=141_600)
    p.add_argument("--every", type=int, default=50, help="step-based: checkpoint_every")
    p.add_argument("--minutes", type=float, default=30, help="time-based: checkpoint_minutes")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    preset = yaml.safe_load((ROOT / "presets/expansionnet_v2_coco.yaml").read_text())
    experiment = next(iter(preset["experiments"].values()))
    torch.manual_seed(0)
    model = create_model(experiment["model"], vocab_size=10_000, feat_dim=1536, **experiment["model_args"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p_ in model.parameters():  # AdamW's moments exist after the first step
        p_.grad = torch.zeros_like(p_)
    optimizer.step()
    with tempfile.TemporaryDirectory() as tmp:
        run = TrainingRun(
            Path(tmp) / "model.pt",
            Path(tmp) / "history.tsv",
            "key",
            {},
            model,
            optimizer,
            None,
            torch.Generator(),
            1,
            1,
            0,
            "bench",
        )
        sync, blocking, total = [], [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run.save_state()
            sync.append(time.perf_counter() - start)
            start = time.perf_counter()
            run.save_state(background=True)  # what the step pays: the copy
            blocking.append(time.perf_counter() - start)
            run.wait_for_writes()
            total.append(time.perf_counter() - start)
        size = (Path(tmp) / "state/last.pt").stat().st_size
        run._close()
    s, b, t = min(sync), min(blocking), min(total)
    params = sum(p_.numel() for p_ in model.parameters())
    print(f"state: {experiment['model']} {params / 1e6:.1f} M parameters + AdamW moments = {size / 2**20:.0f} MiB")
    print(f"  one save on the training thread: {s:.2f} s; off it: {b:.2f} s blocking (the copy), written in {t:.2f} s")
    by_steps = args.steps_per_hour / args.every
    by_time = 60 / args.minutes
    rows = [
        (f"every {args.every} steps, on the thread", by_steps, by_steps * s),
        (f"every {args.every} steps, off the thread", by_steps, by_steps * b),
        (f"every {args.minutes:g} minutes, off the thread", by_time, by_time * b),
    ]
    print(f"per training hour at {args.steps_per_hour:,.0f} steps/h:")
    for name, saves, seconds in rows:
        print(
            f"  {name:34s} {saves:8.1f} states, {saves * size / 2**30:8.1f} GiB, {seconds:8.1f} s of the training thread"
        )
    print(f"  time-based off the thread vs step-based on it: {rows[0][2] / rows[2][2]:,.0f}x less training-thread time")


if __name__ == "__main__":
    main()
