"""prepro_labels: ruotianluo-style layout, round trip, UNK, truncation, splits, skip list."""

import json
from collections import Counter

import h5py
import numpy as np
import pytest

from captionflow.data.labels import UNK, build_vocab, decode, prepro_labels
from captionflow.errors import CaptionflowError

CAPTIONS = {
    1: ("train", [["a", "red", "circle"], ["a", "red", "ball", "on", "the", "left", "of", "a", "blue", "box"]]),
    2: ("restval", [["a", "blue", "box"], ["one", "blue", "square"]]),
    3: ("val", [["a", "red", "circle", "zebra"]]),
    4: ("test", [["a", "blue", "circle"], ["a", "circle"], ["the", "circle"]]),
    5: ("train", [["a", "red", "box"]]),
}


def _write(tmp_path, skipped_ids=()):
    images = [
        {
            "filepath": "p",
            "filename": f"{i}.jpg",
            "imgid": i,
            "cocoid": i,
            "split": split,
            "sentences": [{"tokens": t} for t in caps],
        }
        for i, (split, caps) in CAPTIONS.items()
    ]
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"images": images}))
    skipped = tmp_path / "skipped.tsv"
    skipped.write_text("id\tfile\treason\n" + "".join(f"{i}\tx\tbad\n" for i in skipped_ids))
    return captions, skipped


def _run(tmp_path, skipped_ids=(), **kw):
    captions, skipped = _write(tmp_path, skipped_ids)
    args = {"max_len": 6, "word_count_threshold": 1, "restval_to_train": True, **kw}
    prepro_labels(captions, skipped, tmp_path / "labels.h5", tmp_path / "labels.json", tmp_path / "refs.json", **args)
    with h5py.File(tmp_path / "labels.h5") as f:
        arrays = {k: f[k][()] for k in f}
    return arrays, json.loads((tmp_path / "labels.json").read_text())


def test_layout_and_round_trip(tmp_path):
    h5, index = _run(tmp_path)
    n_caps = sum(len(c) for _, c in CAPTIONS.values())
    assert h5["labels"].shape == (n_caps, 6) and h5["labels"].dtype == np.int32
    assert h5["label_start_ix"].shape == h5["label_end_ix"].shape == (len(CAPTIONS),)
    assert h5["label_length"].shape == (n_caps,)
    assert [img["id"] for img in index["images"]] == list(CAPTIONS)
    assert [img["split"] for img in index["images"]] == ["train", "train", "val", "test", "train"]
    ix_to_word = index["ix_to_word"]
    vocab = set(ix_to_word.values())
    for img, (start, end) in zip(index["images"], zip(h5["label_start_ix"], h5["label_end_ix"])):
        rows = h5["labels"][start - 1 : end]  # 1-based, inclusive end
        originals = CAPTIONS[img["id"]][1]
        assert len(rows) == len(originals)
        for row, tokens in zip(rows, originals):
            expected = [t if t in vocab else UNK for t in tokens][:6]
            assert decode(row, ix_to_word) == expected
    assert h5["label_length"].tolist() == [min(len(t), 6) for _, caps in CAPTIONS.values() for t in caps]


def test_vocab_from_training_captions_only(tmp_path):
    _, index = _run(tmp_path)
    # training counts: a 5, blue/box/red 3, the rest once (<= threshold 1); "zebra" is val-only
    assert index["ix_to_word"] == {"1": "a", "2": "blue", "3": "box", "4": "red", "5": UNK}
    assert index["vocab_hash"] and index["max_len"] == 6


def test_restval_kept_apart_when_asked(tmp_path):
    _, index = _run(tmp_path, restval_to_train=False)
    assert index["images"][1]["split"] == "restval"


def test_skipped_images_are_dropped_everywhere(tmp_path):
    h5, index = _run(tmp_path, skipped_ids=(3,))
    assert [img["id"] for img in index["images"]] == [1, 2, 4, 5]
    assert h5["label_start_ix"].tolist() == [1, 3, 5, 8]


def test_vocab_order_is_deterministic():
    caps = [["b", "a"], ["a", "b"], ["c"]]
    assert build_vocab(caps, 0) == ["a", "b", "c"]
    assert build_vocab(caps, 1) == ["a", "b", UNK]


def test_no_training_captions_is_a_clear_error(tmp_path):
    captions, skipped = _write(tmp_path, skipped_ids=(1, 2, 5))
    with pytest.raises(CaptionflowError, match="no training captions"):
        prepro_labels(captions, skipped, tmp_path / "l.h5", tmp_path / "l.json", tmp_path / "r.json", 6, 1, True)
    assert not (tmp_path / "l.h5").exists()


def test_blank_tokens_never_enter_the_vocabulary(tmp_path):
    assert build_vocab([["a", "", " "], ["a", "\t", ""]], 0) == ["a"]
    images = [
        {"filename": f"{i}.jpg", "imgid": i, "split": "train", "sentences": [{"tokens": ["a", "", " ", "dog"]}]}
        for i in range(3)
    ]
    (tmp_path / "c.json").write_text(json.dumps({"images": images}))
    (tmp_path / "s.tsv").write_text("id\tfile\treason\n")
    prepro_labels(
        tmp_path / "c.json", tmp_path / "s.tsv", tmp_path / "l.h5", tmp_path / "l.json", tmp_path / "r.json", 6, 0, True
    )
    index = json.loads((tmp_path / "l.json").read_text())
    assert sorted(index["ix_to_word"].values()) == ["a", "dog"]
    with h5py.File(tmp_path / "l.h5") as f:
        assert f["label_length"][()].tolist() == [2, 2, 2]


def _captions_file(tmp_path, captions):
    images = [
        {"filename": f"{i}.jpg", "imgid": i, "split": "train", "sentences": [{"tokens": cap.split()}]}
        for i, cap in enumerate(captions)
    ]
    (tmp_path / "c.json").write_text(json.dumps({"images": images}))
    (tmp_path / "s.tsv").write_text("id\tfile\treason\n")
    return tmp_path / "c.json", tmp_path / "s.tsv"


WORDS = "a red blue green big small circle square star box left right of above below".split()


@pytest.mark.parametrize(
    "captions, threshold, degenerate",
    [
        ([" ".join(WORDS)] * 3, 2, False),  # 16 words, none UNK
        ([" ".join(WORDS)] * 3, 5, True),  # every word seen 3 times <= 5: all UNK
        (["a red circle", "a blue box"] * 5, 0, True),  # 5 words: a tiny vocabulary
        ([" ".join(WORDS)] * 3 + [f"a w{i} x{i} y{i} z{i} v{i}" for i in range(20)], 2, True),  # most tokens UNK
    ],
)
def test_degenerate_vocabulary_warns_naming_the_key(tmp_path, capsys, captions, threshold, degenerate):
    c, s = _captions_file(tmp_path, captions)
    prepro_labels(c, s, tmp_path / "l.h5", tmp_path / "l.json", tmp_path / "r.json", 16, threshold, True)
    err = capsys.readouterr().err
    assert ("warning: degenerate vocabulary" in err) == degenerate
    if degenerate:
        line = next(line for line in err.splitlines() if "degenerate" in line)
        assert f"labels.word_count_threshold (now {threshold}" in line


def _straightforward_prepro(images, skipped_ids, max_len, threshold):
    """prepro_labels written plainly, caption by caption: (arrays, ix_to_word, index, refs)."""
    images = [img for img in images if img["cocoid"] not in skipped_ids]
    split_of = {"restval": "train"}
    counts = Counter(
        w
        for img in images
        if split_of.get(img["split"], img["split"]) == "train"
        for s in img["sentences"]
        for w in s["tokens"]
    )
    vocab = sorted((w for w, c in counts.items() if c > threshold), key=lambda w: (-counts[w], w))
    vocab += [UNK] if len(vocab) < len(counts) else []
    word_to_ix = {w: i + 1 for i, w in enumerate(vocab)}
    rows, lengths, start, end, index, refs = [], [], [], [], [], {}
    for img in images:
        start.append(len(rows) + 1)
        for s in img["sentences"]:
            row = [word_to_ix.get(w, word_to_ix.get(UNK, 0)) for w in s["tokens"][:max_len]]
            lengths.append(len(row))
            rows.append(row + [0] * (max_len - len(row)))
        end.append(len(rows))
        split = split_of.get(img["split"], img["split"])
        index.append({"id": img["cocoid"], "split": split, "file_path": f"{img['filepath']}/{img['filename']}"})
        if split != "train":
            refs.setdefault(split, {})[str(img["cocoid"])] = [s["raw"] for s in img["sentences"]]
    arrays = {"labels": rows, "label_start_ix": start, "label_end_ix": end, "label_length": lengths}
    return arrays, {str(i + 1): w for i, w in enumerate(vocab)}, index, refs


def test_outputs_equal_a_straightforward_reference(tmp_path):
    # Zipf-like words (common ones and a tail that becomes UNK), lengths past max_len,
    # every split, a skip list, words seen only outside train: each path of prepro_labels.
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(60)]
    p = 1.0 / np.arange(1, 61)
    images = []
    for i in range(80):
        sentences = []
        for _ in range(int(rng.integers(1, 6))):
            tokens = [words[k] for k in rng.choice(60, size=int(rng.integers(1, 13)), p=p / p.sum())]
            sentences.append({"tokens": tokens, "raw": " ".join(tokens).capitalize() + "."})
        split = ("train", "restval", "val", "test")[int(rng.integers(4))]
        images.append(
            {
                "filepath": "p",
                "filename": f"{i}.jpg",
                "imgid": i,
                "cocoid": 500 + i,
                "split": split,
                "sentences": sentences,
            }
        )
    (tmp_path / "c.json").write_text(json.dumps({"images": images}))
    skipped_ids = {503, 517, 560}
    (tmp_path / "s.tsv").write_text("id\tfile\treason\n" + "".join(f"{i}\tx\tbad\n" for i in sorted(skipped_ids)))
    prepro_labels(
        tmp_path / "c.json", tmp_path / "s.tsv", tmp_path / "l.h5", tmp_path / "l.json", tmp_path / "r.json", 8, 2, True
    )

    arrays, ix_to_word, index, refs = _straightforward_prepro(images, skipped_ids, 8, 2)
    assert UNK in ix_to_word.values() and any(
        len(s["tokens"]) > 8 for img in images for s in img["sentences"]
    )  # both occur
    with h5py.File(tmp_path / "l.h5") as f:
        assert sorted(f) == sorted(arrays)
        for key, expected in arrays.items():
            assert f[key].dtype == np.int32 and f[key][()].tolist() == expected, key
    meta = json.loads((tmp_path / "l.json").read_text())
    assert meta["ix_to_word"] == ix_to_word and meta["images"] == index
    assert json.loads((tmp_path / "r.json").read_text()) == refs
