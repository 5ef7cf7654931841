"""Benchmark prepro_labels at COCO size against a straightforward reference, same file, same run.

    python bench/bench_labels.py [--images 123287] [--repeats 3]

A synthetic caption file in Karpathy's dataset_coco.json schema and at its size:
123,287 images (Karpathy's split: 82,783 train, 30,504 restval, 5,000 val, 5,000 test),
5 sentences each with `tokens`, `raw`, `imgid` and `sentid`, words drawn Zipf-like from a
25,000-word vocabulary (p ~ rank^-1.4, so ~10k words are seen more than 5 times; COCO has
9,487), lengths 8..16 (mean 12; COCO's is ~10.5). Both sides read it with
labels.word_count_threshold 5 and max_len 16, the usual COCO settings.

The reference is what one would write without caring about bad input: json.load, a Counter
vocabulary, one numpy array from padded lists, h5py and json.dump. It must write the same
labels HDF5 (datasets, dtypes, values) and byte-identical labels and references JSON.
CPU seconds (process time), the best of `repeats` runs of each, alternated; goal: prepro_labels
within 1.2x of the reference.
"""

import argparse
import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import h5py
import numpy as np

from captionflow.data.labels import prepro_labels

SPLITS = {"train": 82_783, "restval": 30_504, "val": 5_000, "test": 5_000}
VOCAB = 25_000
SENTENCES = 5
MAX_LENGTH = 16
THRESHOLD = 5


def make_words(rng):
    """VOCAB distinct lower-case pseudo-words of 2..9 letters."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = set()
    while len(words) < VOCAB:
        words.add("".join(rng.choice(letters, size=int(rng.integers(2, 10)))))
    return sorted(words)


def make_captions_file(path, num_images, seed=0):
    """A Karpathy-schema caption file of `num_images` images (COCO's split proportions)."""
    rng = np.random.default_rng(seed)
    words = np.array(make_words(rng), dtype=object)
    lengths = rng.integers(8, 17, size=num_images * SENTENCES)
    p = np.arange(1, VOCAB + 1) ** -1.4  # rank r ~ r^-1.4: ~10k words seen more than 5 times, as in COCO
    tokens = words[rng.choice(VOCAB, size=int(lengths.sum()), p=p / p.sum())].tolist()
    total = sum(SPLITS.values())
    splits = [s for s, n in SPLITS.items() for _ in range(round(n * num_images / total))]
    splits += ["train"] * (num_images - len(splits))
    images, pos = [], 0
    for i in range(num_images):
        sentences = []
        for j in range(SENTENCES):
            n = int(lengths[i * SENTENCES + j])
            toks = tokens[pos : pos + n]
            pos += n
            sentences.append(
                {"tokens": toks, "raw": " ".join(toks).capitalize() + ".", "imgid": i, "sentid": i * SENTENCES + j}
            )
        folder = "val2014" if splits[i] != "train" else "train2014"
        images.append(
            {
                "filepath": folder,
                "sentids": [s["sentid"] for s in sentences],
                "filename": f"COCO_{folder}_{i:012d}.jpg",
                "imgid": i,
                "split": splits[i],
                "sentences": sentences,
                "cocoid": 100_000 + i,
            }
        )
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))


def reference(captions, out_h5, out_json, out_refs, max_len, threshold):
    """prepro_labels as one would write it trusting the input (no skip list, restval -> train)."""
    with open(captions) as f:
        images = json.load(f)["images"]
    split_of = {"restval": "train"}
    counts = Counter(
        w
        for img in images
        if split_of.get(img["split"], img["split"]) == "train"
        for s in img["sentences"]
        for w in s["tokens"]
    )
    vocab = sorted((w for w, c in counts.items() if c > threshold), key=lambda w: (-counts[w], w))
    if len(vocab) < len(counts):
        vocab.append("UNK")
    word_to_ix = {w: i + 1 for i, w in enumerate(vocab)}
    unk = word_to_ix.get("UNK", 0)
    rows, start, end, index, refs = [], [], [], [], {}
    for img in images:
        start.append(len(rows) + 1)
        for s in img["sentences"]:
            rows.append([word_to_ix.get(w, unk) for w in s["tokens"][:max_len]])
        end.append(len(rows))
        image_id, split = img.get("cocoid", img["imgid"]), split_of.get(img["split"], img["split"])
        index.append({"id": image_id, "split": split, "file_path": os.path.join(img["filepath"], img["filename"])})
        if split != "train":
            refs.setdefault(split, {})[str(image_id)] = [s["raw"] for s in img["sentences"]]
    lengths = [len(r) for r in rows]
    labels = np.array([r + [0] * (max_len - len(r)) for r in rows], dtype=np.int32)
    with h5py.File(out_h5, "w") as f:
        f.create_dataset("labels", data=labels)
        f.create_dataset("label_start_ix", data=np.array(start, dtype=np.int32))
        f.create_dataset("label_end_ix", data=np.array(end, dtype=np.int32))
        f.create_dataset("label_length", data=np.array(lengths, dtype=np.int32))
    ix_to_word = {str(i + 1): w for i, w in enumerate(vocab)}
    digest = hashlib.sha256("\n".join(vocab).encode()).hexdigest()[:16]
    meta = {
        "ix_to_word": ix_to_word,
        "vocab_hash": digest,
        "max_len": max_len,
        "word_count_threshold": threshold,
        "images": index,
    }
    for path, obj in ((out_json, meta), (out_refs, refs)):
        with open(path, "w") as f:
            json.dump(obj, f)
            f.write("\n")


def same_outputs(a, b):
    """The names of the outputs that differ between run directories a and b (empty: none)."""
    differ = [name for name in ("labels.json", "references.json") if (a / name).read_bytes() != (b / name).read_bytes()]
    with h5py.File(a / "labels.h5") as fa, h5py.File(b / "labels.h5") as fb:
        if sorted(fa) != sorted(fb):
            differ.append("labels.h5 datasets")
        for key in sorted(set(fa) & set(fb)):
            x, y = fa[key][()], fb[key][()]
            if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x, y):
                differ.append(f"labels.h5:{key}")
    return differ


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=sum(SPLITS.values()))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        captions, skipped = root / "captions.json", root / "skipped.tsv"
        make_captions_file(captions, args.images)
        skipped.write_text("id\tfile\treason\n")
        print(
            f"{args.images} images x {SENTENCES} captions, {VOCAB} words drawn, {captions.stat().st_size / 2**20:.0f} MiB of JSON"
        )

        def ours():
            out = root / "ours"
            out.mkdir(exist_ok=True)
            with contextlib.redirect_stdout(None):  # its summary line, once per repeat
                prepro_labels(
                    captions,
                    skipped,
                    out / "labels.h5",
                    out / "labels.json",
                    out / "references.json",
                    MAX_LENGTH,
                    THRESHOLD,
                    True,
                )

        def ref():
            out = root / "ref"
            out.mkdir(exist_ok=True)
            reference(captions, out / "labels.h5", out / "labels.json", out / "references.json", MAX_LENGTH, THRESHOLD)

        times = {"prepro_labels": [], "reference": []}
        for _ in range(args.repeats):
            for name, fn in (("prepro_labels", ours), ("reference", ref)):
                t = time.process_time()
                fn()
                times[name].append(time.process_time() - t)
        differ = same_outputs(root / "ours", root / "ref")
        print(f"outputs identical: {'yes' if not differ else 'NO, ' + ', '.join(differ)}")
        for name, secs in times.items():
            print(
                f"{name:<14}: {min(secs):6.2f} CPU s (best of {args.repeats}; all {', '.join(f'{s:.2f}' for s in secs)})"
            )
        ratio = min(times["prepro_labels"]) / min(times["reference"])
        print(f"ratio         : {ratio:6.2f}x the reference (goal <= 1.2x)")


if __name__ == "__main__":
    main()
