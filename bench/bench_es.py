"""Evolution strategies on the demo: offspring/s per worker, 1 vs 2 processes, bytes per
generation against shipping parameter vectors, and val CIDEr-D against wall-clock time for
NIC-NES vs SCST from the same XE start.

    .venv/bin/python bench/bench_es.py [--workdir DIR]

Needs a finished `make demo` in the working directory (results/fc/xe/model.pt, the demo's
features, labels and document frequencies): every figure is measured in this run.
"""

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

from captionflow.config import build
from captionflow.models import checkpoint
from captionflow.training import distributed, es, scst
from captionflow.training.es import ESConfig
from captionflow.training.scst import SCSTConfig


def _inputs(root):
    features = sorted((root / "results/features").iterdir())[0]
    data = root / "results/data"
    return dict(
        features_train=features / "train.h5",
        features_val=features / "val.h5",
        labels_h5=data / "labels.h5",
        labels_json=data / "labels.json",
        references=data / "references.json",
        cider_df=data / "cider_df_train.npz",
    )


def _history(path):
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=".")
    p.add_argument("--iterations", type=int, default=30)
    args = p.parse_args()
    root = Path(args.workdir)
    start = root / "results/fc/xe/model.pt"
    inputs = _inputs(root)
    cpus = len(os.sched_getaffinity(0))
    init_val = checkpoint.load(start)["val_cider_d"]
    n_params = sum(v.numel() for v in checkpoint.load(start)["model"].values())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = {}
        for processes in (1, 2):
            cfg = build(
                ESConfig,
                algorithm="nes",
                iterations=args.iterations,
                offspring=16,
                noise_stdev=0.01,
                stepsize=0.003,
                val_every=5,
                device="cpu",
            )
            out = tmp / f"nes{processes}"
            started = time.time()
            distributed.launch(
                es.train,
                processes,
                **inputs,
                init_checkpoint=start,
                model_name="fc",
                model_args={},
                out_checkpoint=out / "model.pt",
                out_history=out / "history.tsv",
                cfg=cfg,
                threads=cpus,
            )
            runs[processes] = (time.time() - started, _history(out / "history.tsv"))
        started = time.time()
        scst_cfg = build(
            SCSTConfig, epochs=2, batch_size=25, samples=5, baseline="mean_of_others", lr=5e-5, device="cpu"
        )
        scst.train(
            **inputs,
            init_checkpoint=start,
            out_checkpoint=tmp / "scst/model.pt",
            out_history=tmp / "scst/history.tsv",
            out_signature=tmp / "scst/reward.txt",
            cfg=scst_cfg,
            threads=cpus,
        )
        scst_seconds, scst_history = time.time() - started, _history(tmp / "scst/history.tsv")

    lam = 16
    print(f"fc on the demo ({n_params} parameters), NIC-NES lambda {lam}, {args.iterations} generations, {cpus} CPUs")
    for processes, (seconds, history) in runs.items():
        rate = sum(float(r["offspring_per_s"]) for r in history) / len(history)
        print(
            f"  {processes} process(es): {seconds:.1f} s wall (incl. start-up), {rate:.1f} offspring/s overall, {rate / processes:.1f} per worker"
        )
    one, two = runs[1][1], runs[2][1]
    same = all(a["val_cider_d"] == b["val_cider_d"] for a, b in zip(one, two))
    print(f"  2 processes reproduce 1 process's val CIDEr-D at every validation: {same}")
    sent = int(two[0]["bytes_exchanged"])
    print(
        f"  bytes per generation and process: {sent} (lambda float64 fitnesses); shipping each offspring's float32 "
        f"parameters as the seed design does: {lam * 4 * n_params} ({lam * 4 * n_params / max(sent, 1):.0f}x); disk per generation: 0 vs {lam * 4 * n_params}"
    )
    print(f"  val CIDEr-D from the XE start {init_val:.4f}:")
    elapsed = runs[1][0] / len(one)
    for r in one:
        if r["val_cider_d"]:
            print(
                f"    NES  generation {int(r['epoch']) + 1:3d}  ~{elapsed * (int(r['epoch']) + 1):6.1f} s  val {float(r['val_cider_d']):.4f}"
            )
    for r in scst_history:
        print(
            f"    SCST epoch {int(r['epoch']) + 1:3d}       ~{scst_seconds * (int(r['epoch']) + 1) / len(scst_history):6.1f} s  val {float(r['val_cider_d']):.4f}"
        )


if __name__ == "__main__":
    main()
