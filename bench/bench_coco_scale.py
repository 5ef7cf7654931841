"""Benchmark the DAG at COCO's size: time and peak memory per stage, DAG build, no-op rerun.

    python bench/bench_coco_scale.py [--sizes 1000 10000 123287] [--workdir /tmp/coco_scale]

For each size it generates a Karpathy-schema caption file with COCO's shape (Karpathy's
split proportions: 5,000 test and val images at 123,287; 5 captions per image, a few with
6 or 7; 8 to 15 words each, the tail drawn from a Zipf vocabulary of 10,000 words, all of
which pass the count threshold of 5 at COCO's size, as COCO's 9,487 do) and small JPEGs
(80x60, COCO's folder and file names), then runs the real Snakefile on it with real
Snakemake, as a user would:

    snakemake -n evaluate                DAG build (a dry run on the fresh directory)
    snakemake --cores 2 evaluate         resize, labels, CIDEr df, features (resnet18 at 64
                                         px, float16), one XE epoch and one SCST epoch of a
                                         small Show-Attend-Tell, evaluate both on the test split
    snakemake --cores 2 evaluate         the no-op rerun: nothing to do

It prints each stage's wall time and peak memory (Snakemake's own `benchmark:` files:
`max_pss`, the proportional set size summed over the job's process tree, so that pages a
forked worker shares with its parent count once; sampled every 0.5 s for the first 15 s
of a job, then every 30 s, so a short spike can be missed), the DAG build and the no-op
rerun (wall time and the snakemake process's peak memory), and the growth exponent
between consecutive sizes (log of the time ratio over log of the size ratio: 1 is
linear). Goals: no stage grows worse than linearly, every stage fits 24 GB, a no-op rerun
at 123,287 images under 10 s.
The generated data stays under --workdir (about 1 GB at COCO's size) unless --clean.
"""

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")

COCO_IMAGES = 123_287
# Karpathy's split of COCO (dataset_coco.json): images per split.
KARPATHY_SPLITS = {"test": 5000, "val": 5000, "restval": 30_504, "train": 82_783}
VOCAB_WORDS = 10_000
COLOURS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200), "yellow": (220, 200, 40)}
SHAPES = ("square", "bar", "column")

# The stages the table shows: (label, benchmark file under benchmarks/).
STAGES = [
    ("resize_images", "resize_images.tsv"),
    ("prepro_labels", "prepro_labels.tsv"),
    ("prepro_cider_df", "prepro_cider_df.tsv"),
    ("extract_features", "extract_features.tsv"),
    ("train_xe (1 epoch)", "train_xe/sat.tsv"),
    ("train_scst (1 epoch)", "train_scst/sat.tsv"),
    ("evaluate xe (test)", "evaluate/sat_xe.tsv"),
    ("evaluate scst (test)", "evaluate/sat_scst.tsv"),
]


def split_sizes(n):
    """Karpathy's split proportions scaled to n images (exactly Karpathy's at COCO's size)."""
    sizes = {s: round(k * n / COCO_IMAGES) for s, k in KARPATHY_SPLITS.items() if s != "train"}
    sizes["train"] = n - sum(sizes.values())
    return sizes


def _write_images(job):
    """Worker: write the JPEGs of one chunk [(path, colour, shape)]."""
    for path, colour, shape in job:
        pixels = np.full((60, 80, 3), 235, np.uint8)
        x0, y0, w, h = {"square": (25, 15, 30, 30), "bar": (10, 22, 60, 16), "column": (32, 5, 16, 50)}[shape]
        pixels[y0 : y0 + h, x0 : x0 + w] = COLOURS[colour]
        Image.fromarray(pixels).save(path, quality=85)


def make_dataset(root, n, seed=0):
    """COCO-shaped caption file and JPEGs for n images under root -> (the file's path, the
    number of captions)."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, VOCAB_WORDS + 1)
    word_p = 1.0 / (ranks + 2.7)
    word_p /= word_p.sum()
    words = np.array([f"w{r}" for r in ranks])
    splits = [s for s, k in split_sizes(n).items() for _ in range(k)]
    images, jobs, sentid = [], [], 0
    colours, shapes = list(COLOURS), list(SHAPES)
    for imgid, split in enumerate(splits):
        folder = "val2014" if split in ("val", "test", "restval") else "train2014"
        filename = f"COCO_{folder}_{imgid:012d}.jpg"
        colour, shape = colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))]
        jobs.append((str(root / "images" / folder / filename), colour, shape))
        sentences = []
        for _ in range(5 + int(rng.random() < 0.003) + int(rng.random() < 0.001)):
            tail = words[rng.choice(VOCAB_WORDS, size=int(rng.integers(5, 13)), p=word_p)].tolist()
            tokens = ["a", colour, shape, *tail]
            sentences.append({"tokens": tokens, "raw": " ".join(tokens) + ".", "imgid": imgid, "sentid": sentid})
            sentid += 1
        images.append(
            {
                "filepath": folder,
                "filename": filename,
                "imgid": imgid,
                "cocoid": imgid,
                "split": split,
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
            }
        )
    for folder in ("train2014", "val2014"):
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
    chunks = [jobs[i : i + 2000] for i in range(0, len(jobs), 2000)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_write_images, chunks))
    captions = root / "dataset_coco.json"
    captions.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return captions, sentid


def bench_config(root, captions):
    """The run's config: COCO's data recipe at a small image size, a small captioner."""
    return {
        "seed": 0,
        "data": {"source": "karpathy", "karpathy_json": str(captions), "images_root": str(root / "images")},
        "resize": {"size": 64, "threads": 2},
        "labels": {"max_len": 16, "word_count_threshold": 5},
        "features": {"backbone": "resnet18", "dtype": "float16", "batch_size": 128, "num_workers": 1, "threads": 2},
        "experiments": {
            "sat": {
                "model": "show_attend_tell",
                "model_args": {"embed_size": 32, "hidden_size": 64, "att_size": 32, "dropout": 0.2},
                "stages": ["xe", "scst"],
                "xe": {"epochs": 1, "batch_size": 100, "lr": 1.0e-3},
                "scst": {"epochs": 1, "batch_size": 50, "samples": 5, "lr": 5.0e-5},
                "evaluate": {"beam_size": 3},
            }
        },
    }


def run_size(n, workdir):
    """Generate, build the DAG, run, rerun: the figures of one size."""
    root = workdir / f"coco_{n}"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    t = time.perf_counter()
    captions, n_captions = make_dataset(root / "data", n)
    gen = time.perf_counter() - t
    (root / "config.yaml").write_text(yaml.safe_dump(bench_config(root / "data", captions)))
    print(f"\n{n:,} images, {n_captions:,} captions: generated in {gen:.1f} s ({captions.stat().st_size / 1e6:.0f} MB)")

    row = {"images": n, "captions": n_captions}
    row["dag_build"], row["dag_build_mb"] = timed_snakemake(root, "-n", "evaluate")
    row["run"], _ = timed_snakemake(root, "--cores", "2", "evaluate")
    row["noop"], row["noop_mb"] = timed_snakemake(root, "--cores", "2", "evaluate", expect_nothing=True)
    for label, tsv in STAGES:
        with open(root / "benchmarks" / tsv) as f:
            rec = next(csv.DictReader(f, delimiter="\t"))
        row[label] = (float(rec["s"]), float(rec["max_pss"]))
    with open(root / "results" / "data" / "labels.json") as f:
        row["vocab"] = len(json.load(f)["ix_to_word"])
    row["features_gb"] = sum(p.stat().st_size for p in (root / "results" / "features").rglob("*.h5")) / 1e9
    return row


def timed_snakemake(root, *args, expect_nothing=False):
    """Wall seconds and the snakemake process's peak RSS (MB) of one invocation."""
    cmd = [
        "/usr/bin/time",
        "-f",
        "%M",
        str(SNAKEMAKE),
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(root),
    ]
    start = time.perf_counter()
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"snakemake {' '.join(args)} failed in {root}:\n{proc.stderr[-3000:]}")
    if expect_nothing and "Nothing to be done" not in proc.stdout + proc.stderr:
        raise SystemExit(f"the rerun in {root} was not a no-op:\n{proc.stderr[-3000:]}")
    peak_kb = int(proc.stderr.strip().splitlines()[-1])
    return wall, peak_kb / 1024


def exponent(a, b, na, nb):
    """Growth exponent between two sizes: log(b/a) / log(nb/na); 1 = linear."""
    if a <= 0 or b <= 0:
        return float("nan")
    return math.log(b / a) / math.log(nb / na)


def print_table(rows):
    sizes = [r["images"] for r in rows]
    head = "| stage | " + " | ".join(f"{n:,} images" for n in sizes) + " | "
    head += " | ".join(f"exp. {a:,}→{b:,}" for a, b in zip(sizes, sizes[1:])) + " |"
    print("\n" + head)
    print("|" + " --- |" * (1 + len(sizes) + len(sizes) - 1))

    def line(label, values):
        cells = [f"{v:.1f} s, {mb:,.0f} MB" if mb is not None else f"{v:.2f} s" for v, mb in values]
        exps = [exponent(a[0], b[0], na, nb) for (a, b, na, nb) in zip(values, values[1:], sizes, sizes[1:])]
        print(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(f"{e:.2f}" for e in exps) + " |")

    for label, _ in STAGES:
        line(label, [r[label] for r in rows])
    line("DAG build (`snakemake -n`)", [(r["dag_build"], r["dag_build_mb"]) for r in rows])
    line("no-op rerun", [(r["noop"], r["noop_mb"]) for r in rows])
    line("whole run", [(r["run"], None) for r in rows])
    print("\nfeature files: " + ", ".join(f"{r['features_gb']:.2f} GB" for r in rows))
    print("vocabulary (the XE and SCST output layer): " + ", ".join(f"{r['vocab']:,} words" for r in rows))
    peak = max(mb for r in rows for label, _ in STAGES for _, mb in [r[label]])
    print(f"largest stage peak: {peak / 1024:.1f} GB (goal: under 24 GB)")
    last = rows[-1]
    print(f"no-op rerun at {last['images']:,} images: {last['noop']:.1f} s (goal: under 10 s)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, COCO_IMAGES])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/coco_scale"))
    parser.add_argument("--clean", action="store_true", help="delete each size's directory after it ran")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        rows.append(run_size(n, args.workdir.resolve()))
        if args.clean:
            shutil.rmtree(args.workdir / f"coco_{n}")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
