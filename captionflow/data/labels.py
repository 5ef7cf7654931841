"""Stage prepro_labels: captions -> vocabulary, labels HDF5, labels JSON and references JSON.

The layout is the one users of ruotianluo/ImageCaptioning.pytorch know:

labels HDF5
    labels          (M, L) int32, word indices, zero-padded; M captions, L = max_len
    label_start_ix  (N,)   int32, 1-based index of image i's first caption row
    label_end_ix    (N,)   int32, 1-based, inclusive index of its last caption row
    label_length    (M,)   int32, caption lengths after truncation
labels JSON
    ix_to_word      {"1": word, ...}; index 0 is padding / end of sentence
    images          [{id, split, file_path[, person_id]}], in the same order as label_start_ix
                    (person_id: the identity, where the caption file has one: CUHK-PEDES)
references JSON
    {split: {image_id: [raw caption, ...]}} for every split but train: the full,
    untruncated references that validation and the evaluate stage score against

Image i's captions are labels[label_start_ix[i] - 1 : label_end_ix[i]].
"""

import csv
import hashlib
import sys
from collections import Counter
from itertools import chain, repeat

import h5py
import numpy as np

from captionflow.data.karpathy import load_karpathy
from captionflow.errors import CaptionflowError
from captionflow.utils.io import atomic_path, write_json

UNK = "UNK"
# Below these a vocabulary cannot describe images: prepro_labels warns (labels.word_count_threshold).
MIN_WORDS = 10
MAX_UNK_FRACTION = 0.5


def build_vocab(captions, word_count_threshold):
    """Words seen more than `word_count_threshold` times -> list, most frequent first.

    Rarer words map to UNK (appended last when any word is rare). Ties are broken
    alphabetically so the vocabulary does not depend on caption order. Blank or
    whitespace-only tokens are no words and never enter it.
    """
    return _vocab_of(_word_counts(captions), word_count_threshold)


def _word_counts(captions):
    counts = Counter(chain.from_iterable(captions))
    for blank in [w for w in counts if not w.strip()]:
        del counts[blank]
    return counts


def _vocab_of(counts, word_count_threshold):
    vocab = sorted((w for w, c in counts.items() if c > word_count_threshold), key=lambda w: (-counts[w], w))
    if len(vocab) < len(counts) and UNK not in vocab:
        vocab.append(UNK)
    return vocab


def vocab_hash(ix_to_word):
    """Short stable hash of a vocabulary, stored in checkpoints to refuse a mismatched one."""
    text = "\n".join(ix_to_word[str(i)] for i in range(1, len(ix_to_word) + 1))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode(captions, word_to_ix, max_len):
    """M token sequences -> labels (M, max_len) int32 and lengths (M,) int32.

    Words missing from word_to_ix become UNK (0 when it has none); each row is truncated
    to max_len and 0-padded; lengths are after truncation.
    """
    full = np.fromiter(map(len, captions), dtype=np.intp, count=len(captions))
    unk = word_to_ix.get(UNK, 0)
    ids = np.fromiter(map(word_to_ix.get, chain.from_iterable(captions), repeat(unk)), dtype=np.int32, count=full.sum())
    # (T,) position of each flat token in its caption; the kept ones fill the rows in order
    pos = np.arange(len(ids)) - np.repeat(np.cumsum(full) - full, full)
    lengths = np.minimum(full, max_len).astype(np.int32)
    labels = np.zeros((len(captions), max_len), dtype=np.int32)
    labels[np.arange(max_len) < lengths[:, None]] = ids[pos < max_len]
    return labels, lengths


def decode(row, ix_to_word):
    """Int row -> token list, stopping at the first 0."""
    words = []
    for ix in row:
        if ix == 0:
            break
        words.append(ix_to_word[str(int(ix))])
    return words


def vocab_warning(vocab, n_tokens, n_unk, n_captions, word_count_threshold):
    """One warning line when the vocabulary is degenerate (tiny, or most training tokens
    UNK), naming the key to change; None when it looks usable."""
    words = len([w for w in vocab if w != UNK])
    unk_share = n_unk / max(n_tokens, 1)
    if words >= MIN_WORDS and unk_share <= MAX_UNK_FRACTION:
        return None
    return (
        f"warning: degenerate vocabulary: {words} words besides {UNK}, {unk_share:.0%} of the "
        f"{n_tokens} training tokens become {UNK} ({n_captions} training captions); captions "
        f"will repeat a few words. Lower labels.word_count_threshold (now {word_count_threshold}: "
        "words seen that often or less become UNK) or add training captions"
    )


def _warn(line):
    """A warning to stderr (the rule's log) and, when a workflow script has sent stderr to
    its log, also to the process's original stderr: Snakemake's console."""
    print(line, file=sys.stderr, flush=True)
    if sys.__stderr__ is not None and sys.__stderr__ is not sys.stderr:
        try:
            print(f"prepro_labels: {line}", file=sys.__stderr__, flush=True)
        except (OSError, ValueError):
            pass


def _read_skipped(path):
    with open(path) as f:
        return {int(row["id"]) for row in csv.DictReader(f, delimiter="\t")}


def prepro_labels(
    captions, skipped, out_labels_h5, out_labels_json, out_references, max_len, word_count_threshold, restval_to_train
):
    """Write the labels HDF5, labels JSON and references JSON for every image not skipped.

    captions: Karpathy-schema JSON. skipped: the skip list TSV written by resize_images.
    restval_to_train: Karpathy's `restval` images join `train` (the usual 113k COCO split).
    """
    drop = _read_skipped(skipped)
    records = [r for r in load_karpathy(captions) if r.id not in drop]
    split_of = {"restval": "train" if restval_to_train else "restval"}
    train_caps = [cap for r in records if split_of.get(r.split, r.split) == "train" for cap in r.captions]
    if not train_caps:
        raise CaptionflowError(f"captions file {captions}: no training captions left to build a vocabulary from")
    counts = _word_counts(train_caps)
    vocab = _vocab_of(counts, word_count_threshold)
    word_to_ix = {w: i + 1 for i, w in enumerate(vocab)}
    ix_to_word = {str(i + 1): w for i, w in enumerate(vocab)}

    all_caps = [cap for rec in records for cap in rec.captions]
    labels, lengths = encode(all_caps, word_to_ix, max_len)
    end = np.cumsum([len(rec.captions) for rec in records], dtype=np.int32)  # 1-based, inclusive
    start = end - np.asarray([len(rec.captions) for rec in records], dtype=np.int32) + 1
    images, refs = [], {}
    for rec in records:
        split = split_of.get(rec.split, rec.split)
        images.append({"id": rec.id, "split": split, "file_path": rec.file_path})
        if rec.person_id is not None:
            images[-1]["person_id"] = rec.person_id
        if split != "train":
            refs.setdefault(split, {})[str(rec.id)] = list(rec.raw)

    with atomic_path(out_labels_h5) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("labels", data=labels)
            f.create_dataset("label_start_ix", data=start)
            f.create_dataset("label_end_ix", data=end)
            f.create_dataset("label_length", data=lengths)
    write_json(
        out_labels_json,
        {
            "ix_to_word": ix_to_word,
            "vocab_hash": vocab_hash(ix_to_word),
            "max_len": max_len,
            "word_count_threshold": word_count_threshold,
            "images": images,
        },
    )
    write_json(out_references, refs)
    # Training tokens are the counted words (load_karpathy leaves no blank ones).
    n_unk = sum(c for w, c in counts.items() if w not in word_to_ix)
    splits = Counter(img["split"] for img in images)
    print(
        f"vocabulary {len(vocab)} words ({n_unk} training tokens -> {UNK}); "
        f"{len(labels)} captions of {len(images)} images; splits {dict(sorted(splits.items()))}",
        flush=True,
    )
    n_tokens = sum(map(len, train_caps))
    warning = vocab_warning(vocab, n_tokens, n_unk, len(train_caps), word_count_threshold)
    if warning:
        _warn(warning)
