"""CIDEr-D over token ids: parity with pycocoevalcap's Cider, hand-computed training-DF cases, DF files.

Real pycocoevalcap throughout: token id t becomes the word "w<t>", so its n-grams of
words are our n-grams of ids.
"""

import json
import math
from collections import defaultdict

import h5py
import numpy as np
import pytest
import torch
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer

from captionflow.errors import CaptionflowError
from captionflow.metrics.cider import (
    END_TOKEN,
    CiderD,
    DocumentFrequencies,
    document_frequencies,
    document_frequencies_from_labels,
)


def words(ids):
    return " ".join(f"w{t}" for t in ids)


def random_case(rng, vocab, num_images):
    """refs {image: [1..6 refs]} and one hypothesis per image, covering the awkward shapes.

    A small vocabulary makes repeated words and shared n-grams common; hypothesis lengths
    0..20 are both shorter and longer than the references (1..14, some single-word);
    every fourth image has a single reference.
    """
    refs, hyps = {}, []
    for i in range(num_images):
        num_refs = 1 if i % 4 == 0 else int(rng.integers(1, 7))
        refs[f"img{i}"] = [rng.integers(1, vocab + 1, size=int(rng.integers(1, 15))).tolist() for _ in range(num_refs)]
        hyps.append(rng.integers(1, vocab + 1, size=int(rng.integers(0, 21))).tolist())
    if num_images >= 3:
        hyps[1] = []  # always an empty hypothesis
        hyps[2] = list(refs["img2"][0])  # and one that repeats a reference
    return refs, hyps


def pycocoevalcap_cider(refs, hyps):
    gts = {key: [words(r) for r in rs] for key, rs in refs.items()}
    res = {key: [words(h)] for key, h in zip(refs, hyps)}
    return Cider().compute_score(gts, res)


class _CorpusOfSize(list):
    """A list of cooked references whose len() is the training corpus size.

    pycocoevalcap's compute_cider sets ref_len = log(len(self.crefs)); with this and a
    preset document_frequency, its CiderScorer scores a batch against a training DF,
    as ruotianluo's SCST reward does.
    """

    def __init__(self, items, num_docs):
        super().__init__(items)
        self.num_docs = num_docs

    def __len__(self):
        return self.num_docs


def pycocoevalcap_cider_with_df(refs, keys, hyps, df):
    scorer = CiderScorer(n=df.n, sigma=6.0)
    for key, h in zip(keys, hyps):
        scorer += (words(h), [words(r) for r in refs[key]])
    scorer.document_frequency = defaultdict(
        float, {tuple(f"w{t}" for t in row if t): float(c) for row, c in zip(df.ngrams(), df.counts)}
    )
    scorer.crefs = _CorpusOfSize(scorer.crefs, df.num_docs)
    return np.array(scorer.compute_cider())


@pytest.mark.parametrize("vocab", [3, 12, 200, 65535])
def test_corpus_mode_matches_pycocoevalcap(vocab):
    rng = np.random.default_rng(vocab)
    worst = 0.0
    for num_images in (1, 5, 40):
        refs, hyps = random_case(rng, vocab, num_images)
        if num_images == 1:
            hyps = [refs["img0"][0][::-1]]
        mean, per_image = pycocoevalcap_cider(refs, hyps)
        cider = CiderD(refs)
        ours = cider.score(list(refs), hyps)
        assert ours.shape == (num_images,)
        np.testing.assert_allclose(ours, per_image, rtol=0, atol=1e-6)
        assert cider.corpus_score(list(refs), hyps) == pytest.approx(mean, abs=1e-6)
        worst = max(worst, float(np.abs(ours - per_image).max()))
    assert worst < 1e-9  # float64 all the way: far tighter than the 1e-6 asked for


def test_document_frequencies_match_pycocoevalcap():
    refs, hyps = random_case(np.random.default_rng(7), 6, 30)
    scorer = CiderScorer()
    for key, h in zip(refs, hyps):
        scorer += (words(h), [words(r) for r in refs[key]])
    scorer.compute_doc_freq()
    df = document_frequencies(list(refs.values()))
    assert df.num_docs == 30
    ours = {tuple(f"w{t}" for t in row if t): int(c) for row, c in zip(df.ngrams(), df.counts)}
    assert ours == {ngram: int(c) for ngram, c in scorer.document_frequency.items()}


def test_training_df_matches_pycocoevalcap_with_that_df():
    """The SCST reward: a fixed training DF, several samples per image, a (N, T) tensor."""
    rng = np.random.default_rng(3)
    train, _ = random_case(rng, 30, 60)
    df = document_frequencies(list(train.values()))
    refs = {key: train[key] for key in list(train)[:8]}
    keys = [key for key in refs for _ in range(3)]
    hyps = [rng.integers(1, 31, size=int(rng.integers(0, 16))).tolist() for _ in keys]
    expected = pycocoevalcap_cider_with_df(refs, keys, hyps, df)
    padded = torch.zeros(len(hyps), 18, dtype=torch.long)
    for i, h in enumerate(hyps):
        padded[i, : len(h)] = torch.tensor(h, dtype=torch.long)
    padded[:, -1] = 7  # junk after the first 0 is ignored
    ours = CiderD(refs, df=df).score(keys, padded)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)


# Tiny training corpus: 3 images. df: 1 -> 2, 2 -> 1, 3 -> 1, 4 -> 1, (1 2) -> 1, (1 3) -> 1.
TINY_DOCS = [[[1, 2]], [[1, 3]], [[4]]]


def test_training_df_identical_caption():
    # Every order present has cosine 1 (unigrams, bigrams); trigrams and 4-grams are empty: 0.
    cider = CiderD({"a": [[1, 2]]}, df=document_frequencies(TINY_DOCS))
    assert cider.score(["a"], [[1, 2]])[0] == pytest.approx(10 * (1 + 1 + 0 + 0) / 4, abs=1e-12)


def test_training_df_repeated_word_and_unseen_bigram():
    a, b = math.log(3) - math.log(2), math.log(3)  # idf of word 1 (df 2) and word 2 (df 1)
    # unigrams: hyp tf-idf (1: 2a, 2: b), ref (1: a, 2: b); clipping keeps min(2a, a) = a.
    uni = (a * a + b * b) / (math.sqrt(4 * a * a + b * b) * math.sqrt(a * a + b * b))
    # bigrams: hyp (1 1): unseen in the corpus so df counts as 1 -> idf log 3, (1 2): log 3;
    # ref (1 2): log 3. cosine = c^2 / (c sqrt 2 * c).
    bi = 1 / math.sqrt(2)
    # the hyp's trigram (1 1 2) is absent from the ref: 0. Lengths are bigram counts: 2 vs 1.
    penalty = math.exp(-(1**2) / (2 * 6.0**2))
    expected = 10 * penalty * (uni + bi + 0 + 0) / 4
    cider = CiderD({"a": [[1, 2]]}, df=document_frequencies(TINY_DOCS))
    assert cider.score(["a"], [[1, 1, 2]])[0] == pytest.approx(expected, abs=1e-12)


def test_training_df_two_references_and_zero_idf():
    # Corpus of 2 images; word 5 is in both, so its idf is 0 and it carries no weight.
    df = document_frequencies([[[5, 1]], [[5, 2]]])
    # ref [5 1]: uni (5: 0, 1: log 2) and bi ((5 1): log 2) equal the hyp's: cosines 1, 1, 0, 0.
    first = (1 + 1 + 0 + 0) / 4
    # ref [5 2 2]: shares only word 5 (weight 0) with the hyp: every dot product is 0.
    second = 0.0
    cider = CiderD({"k": [[5, 1], [5, 2, 2]]}, df=df)
    scores = cider.score(["k", "k"], [[5, 1], []])
    assert scores[0] == pytest.approx(10 * (first + second) / 2, abs=1e-12)
    assert scores[1] == 0.0  # an empty hypothesis scores 0


def test_document_frequencies_round_trip(tmp_path):
    df = document_frequencies([[[1, 2, 3, 4, 5], [2, 2]], [[65535, 1]], [[9]]])
    path = tmp_path / "df" / "train_df.npz"
    df.save(path)
    with np.load(path, allow_pickle=False) as f:  # plain arrays only
        assert sorted(f.files) == ["counts", "ngrams", "num_docs"]
        assert f["ngrams"].shape == (len(df), 4)
        assert int(f["num_docs"]) == 3
    back = DocumentFrequencies.load(path)
    assert (back.num_docs, back.n) == (3, 4)
    np.testing.assert_array_equal(back.codes, df.codes)
    np.testing.assert_array_equal(back.counts, df.counts)
    assert back[(1,)] == 2 and back[(2,)] == 1 and back[(2, 2)] == 1 and back[(65535, 1)] == 1 and back[(5, 4)] == 0
    assert not list(tmp_path.glob("df/.*tmp*"))  # the temporary file was renamed away


def test_document_frequencies_from_labels(tmp_path):
    # Rows as prepro_labels writes them: zero-padded to L = 4, already truncated; id 6 is UNK.
    labels = np.array(
        [
            [1, 2, 3, 0],  # image 10 (train)
            [1, 6, 0, 0],
            [4, 4, 4, 4],  # image 11 (val): not counted
            [2, 3, 1, 6],  # image 12 (train)
        ],
        dtype=np.int32,
    )
    with h5py.File(tmp_path / "labels.h5", "w") as f:
        f["labels"] = labels
        f["label_start_ix"] = np.array([1, 3, 4], dtype=np.int32)
        f["label_end_ix"] = np.array([2, 3, 4], dtype=np.int32)
    images = [
        {"id": 10, "split": "train", "file_path": "a.jpg"},
        {"id": 11, "split": "val", "file_path": "b.jpg"},
        {"id": 12, "split": "train", "file_path": "c.jpg"},
    ]
    ix_to_word = {str(i): w for i, w in enumerate(["a", "b", "c", "d", "e", "UNK"], start=1)}
    (tmp_path / "labels.json").write_text(json.dumps({"ix_to_word": ix_to_word, "images": images}))
    df = document_frequencies_from_labels(tmp_path / "labels.h5", tmp_path / "labels.json")
    docs = [[[1, 2, 3], [1, 6]], [[2, 3, 1, 6]]]
    expected = document_frequencies(docs, end_token=True)
    np.testing.assert_array_equal(df.codes, expected.codes)
    np.testing.assert_array_equal(df.counts, expected.counts)
    assert df.num_docs == 2
    assert df[(1,)] == 2 and df[(2, 3)] == 2 and df[(6,)] == 2 and df[(4,)] == 0 and df[(2, 3, 1, 6)] == 1
    # every reference ends with the end token, the truncated one of image 12 too
    E = END_TOKEN
    assert df[(E,)] == 2 and df[(6, E)] == 2 and df[(3, E)] == 1 and df[(2, 3, E)] == 1 and df[(3, 1, 6, E)] == 1
    # read back for no_eos / ES: without the end token's n-grams, the rest unchanged
    df.save(tmp_path / "df.npz")
    plain, without = document_frequencies(docs), DocumentFrequencies.load(tmp_path / "df.npz")
    np.testing.assert_array_equal(without.codes, plain.codes)
    np.testing.assert_array_equal(without.counts, plain.counts)
    again = DocumentFrequencies.load(tmp_path / "df.npz", end_token=True)
    np.testing.assert_array_equal(again.codes, df.codes)
    assert again.end_token and not without.end_token


def test_user_errors_are_one_line():
    cider = CiderD({"a": [[1, 2]]})
    with pytest.raises(CaptionflowError, match="no reference captions for image 'b'"):
        cider.score(["b"], [[1]])
    with pytest.raises(CaptionflowError, match="too large"):
        cider.score(["a"], [[70000]])
    with pytest.raises(CaptionflowError, match="counted for n=4"):
        CiderD({"a": [[1]]}, df=document_frequencies([[[1]]]), n=3)


def test_a_truncated_labels_file_is_one_line(tmp_path, tiny_data):
    from captionflow.errors import CaptionflowError
    from captionflow.metrics.cider import document_frequencies_from_labels

    broken = tmp_path / "labels.h5"
    broken.write_bytes((tiny_data / "labels.h5").read_bytes()[:1000])
    with pytest.raises(
        CaptionflowError, match=r"labels .*labels.h5 is not a readable HDF5 file .*; delete it and rerun snakemake"
    ):
        document_frequencies_from_labels(broken, tiny_data / "labels.json")
