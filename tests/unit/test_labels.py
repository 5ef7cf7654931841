"""prepro_labels: ruotianluo-style layout, round trip, UNK, truncation, splits, skip list."""

import json

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
    args = {"max_length": 6, "word_count_threshold": 1, "restval_to_train": True, **kw}
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
    assert index["vocab_hash"] and index["max_length"] == 6


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
    prepro_labels(tmp_path / "c.json", tmp_path / "s.tsv", tmp_path / "l.h5", tmp_path / "l.json", tmp_path / "r.json", 6, 0, True)
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
