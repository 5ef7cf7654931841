"""CIDEr-D over integer token ids, vectorized with numpy: the SCST reward and a fast evaluator.

CIDEr-D (Vedantam et al. 2015, "CIDEr: Consensus-based Image Description Evaluation",
with the -D changes of coco-caption) exactly as pycocoevalcap's `Cider` computes it:

    tf-idf      g_k(s)[w] = tf(w, s) * (log(num_docs) - log(max(1, df(w))))   for k-grams w
    similarity  sum_w min(g_k(hyp)[w], g_k(ref)[w]) * g_k(ref)[w] / (|g_k(hyp)| |g_k(ref)|)
    penalty     * exp(-(l_hyp - l_ref)^2 / (2 sigma^2))
    CIDEr-D     10 * mean over k = 1..n of the mean over the image's references

pycocoevalcap's length l is the number of bigram occurrences, max(len - 1, 0), not the
word count (its `counts2vec` counts terms where the zero-based order index is 1); we keep
that so scores match it to the last digit.

pycocoevalcap cooks every caption into Python dicts on every call, which dominates an
SCST step. Here an n-gram of token ids is one uint64 (16 bits per id for n = 4, so ids
must stay below 2**16); the references are cooked once into flat arrays (each
reference's distinct n-grams, tf-idf values, norms, lengths). A batch of hypotheses
counts its n-grams with one sort, looks them up in the vocabulary once, scatters its
images' reference tf-idf values into a small dense (reference, n-gram) table and
gathers from it for every (hypothesis, reference) pair; `bincount` does the sums. No
Python loop runs per caption or n-gram.

Two document-frequency (DF) modes:
    corpus    df counts the images whose references contain the n-gram, over the
              references being scored: pycocoevalcap's `Cider`, the evaluation metric.
    training  df of a fixed corpus (`DocumentFrequencies`, usually the training split's
              references): the SCST reward, so that a batch's score does not depend on
              which other images happen to share the batch.
"""

import numpy as np

from captionflow.data.captions import read_labels_json
from captionflow.data.store import RELABEL, open_h5, require_datasets
from captionflow.errors import CaptionflowError
from captionflow.utils.io import atomic_path

END_TOKEN = (1 << 16) - 1  # the end token as a word: the largest id CIDEr-D packs at n = 4, above any vocabulary's


def with_end_token(mat, lengths):
    """Append END_TOKEN to packed sequences: (S, T) uint64, (S,) -> (S, T + 1), lengths + 1."""
    mat = np.concatenate([mat, np.zeros((len(mat), 1), dtype=mat.dtype)], axis=1)
    mat[np.arange(len(mat)), lengths] = END_TOKEN
    return mat, lengths + 1


def _bits(n):
    """Bits per token id in an n-gram code: the n ids must fit side by side in 64 bits."""
    return 64 // n


def _pack(seqs):
    """Token-id sequences -> (S, T) uint64 matrix and (S,) lengths, each cut at its first 0.

    seqs: a (S, T) int array or tensor (zero-padded), or a list of S sequences of ints.
    Everything after a sequence's first 0 is zeroed, so n-gram windows can ignore it.
    """
    if hasattr(seqs, "detach"):  # a torch tensor, possibly on the GPU
        seqs = seqs.detach().cpu().numpy()
    if isinstance(seqs, np.ndarray) and seqs.ndim == 2:
        mat = seqs
    else:
        seqs = [np.asarray(s).reshape(-1) for s in seqs]
        lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        mat = np.zeros((len(seqs), int(lens.max(initial=0))), dtype=np.int64)
        if lens.sum():
            mat[np.arange(mat.shape[1]) < lens[:, None]] = np.concatenate(seqs)
    if mat.size and not np.issubdtype(mat.dtype, np.integer):
        raise CaptionflowError(f"CIDEr-D scores integer token ids, got {mat.dtype} values")
    if mat.size and mat.min() < 0:
        raise CaptionflowError(f"CIDEr-D scores positive token ids (0 ends a caption), got {int(mat.min())}")
    zero = mat == 0
    lengths = np.where(zero.any(axis=1), zero.argmax(axis=1), mat.shape[1])
    mat = np.where(np.arange(mat.shape[1]) < lengths[:, None], mat, 0).astype(np.uint64)
    return mat, lengths


def _ngram_codes(mat, lengths, n):
    """All 1..n-gram occurrences of the packed sequences, as codes.

    mat (S, T) uint64, lengths (S,) -> codes (E,) uint64, seq (E,) int64 (which sequence).
    The code of (w_1, .., w_k) is sum_j w_j << (bits * (j - 1)); ids are positive, so a
    k-gram code lies in [2**(bits (k-1)), 2**(bits k)) and the order is readable from it.
    """
    bits = _bits(n)
    if mat.size and int(mat.max()) >= 1 << bits:
        raise CaptionflowError(f"CIDEr-D with n={n} packs token ids in {bits} bits: id {int(mat.max())} is too large")
    num, width = mat.shape
    codes, seqs = [], []
    for k in range(1, min(n, width) + 1):
        code = np.zeros((num, width - k + 1), dtype=np.uint64)
        for j in range(k):
            code |= mat[:, j : width - k + 1 + j] << np.uint64(bits * j)
        valid = np.arange(width - k + 1) + k <= lengths[:, None]  # (S, T - k + 1)
        codes.append(code[valid])
        seqs.append(np.nonzero(valid)[0])
    if not codes:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    return np.concatenate(codes), np.concatenate(seqs)


def _order(codes, n):
    """n-gram order minus one (0 for unigrams) of each code: (E,) uint64 -> (E,) int64."""
    bounds = np.array([1 << (_bits(n) * k) for k in range(1, n)], dtype=np.uint64)
    return np.searchsorted(bounds, codes, side="right").astype(np.int64)


def _whole_codes(rows, n):
    """The code of each row taken as one n-gram: (S, k) ids, k <= n, zero-padded right -> (S,)."""
    rows = np.asarray(rows).astype(np.uint64)
    bits = _bits(n)
    if rows.shape[1] > n or (rows.size and int(rows.max()) >= 1 << bits):
        raise CaptionflowError(
            f"not {n}-grams of token ids below {1 << bits}: shape {rows.shape}, max id {int(rows.max(initial=0))}"
        )
    codes = np.zeros(len(rows), dtype=np.uint64)
    for j in range(rows.shape[1]):
        codes |= rows[:, j] << np.uint64(bits * j)
    return codes


def _lookup(keys, queries):
    """Where each query sits in the sorted `keys`: found (Q,) bool, pos (Q,) (valid where found)."""
    if not len(keys):
        return np.zeros(len(queries), dtype=bool), np.zeros(len(queries), dtype=np.int64)
    pos = np.minimum(np.searchsorted(keys, queries), len(keys) - 1)
    return keys[pos] == queries, pos


def _ranges(starts, counts):
    """Concatenated aranges starts[i] .. starts[i] + counts[i] - 1: (S,), (S,) -> (counts.sum(),)."""
    offsets = np.cumsum(counts) - counts
    return np.repeat(starts - offsets, counts) + np.arange(counts.sum())


def _distinct(codes, seq):
    """The distinct n-grams of each sequence, with their term frequency.

    codes (E,) uint64, seq (E,) int64 occurrences -> ngrams (V,) sorted distinct codes, and
    per distinct (sequence, n-gram), sorted that way: seq (D,), index into ngrams (D,), tf (D,).
    Sorting int64 keys seq * V + index is much faster than a lexsort on two columns.
    """
    ngrams, index = np.unique(codes, return_inverse=True)
    width = max(len(ngrams), 1)
    pairs, tf = np.unique(seq * width + index.reshape(-1), return_counts=True)
    seq, index = np.divmod(pairs, width)
    return ngrams, seq, index, tf


def _sorted_unique(values):
    """np.unique by sorting: numpy 2's default hash-based unique is several times slower here."""
    values = np.sort(values)
    keep = np.ones(len(values), dtype=bool)
    keep[1:] = values[1:] != values[:-1]
    return values[keep]


def _count_docs(doc, index, size):
    """df: for each of `size` n-grams, the number of distinct documents among its entries."""
    pairs = _sorted_unique(doc * size + index)
    return np.bincount(pairs % size, minlength=size)


def _doc_counts(codes, doc):
    """df of n-gram occurrences: codes (E,), doc (E,) -> ngrams (K,) sorted, counts (K,)."""
    ngrams, _, index, _ = _distinct(codes, doc)  # one entry per (document, n-gram)
    return ngrams, np.bincount(index, minlength=len(ngrams))


class DocumentFrequencies:
    """n-gram -> number of documents (images) whose references contain it, and num_docs.

    codes (K,) uint64 sorted n-gram codes (see `_ngram_codes`), counts (K,) int64.
    end_token: whether the references were counted with END_TOKEN appended (their
    n-grams that contain it are among the codes).
    Saved as a .npz of plain arrays (`ngrams` (K, n) int32 zero-padded on the right,
    `counts` (K,), `num_docs` (), and `end_token` () = END_TOKEN when counted with it; a
    file written before the end token was counted has no `end_token`), readable with
    np.load(allow_pickle=False) and independent of the in-memory code layout.
    """

    def __init__(self, codes, counts, num_docs, n=4, end_token=False):
        self.codes = np.asarray(codes, dtype=np.uint64)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.num_docs = int(num_docs)
        self.n = int(n)
        self.end_token = bool(end_token)

    def __len__(self):
        return len(self.codes)

    def __getitem__(self, ngram):
        """df of one n-gram, given as a tuple of token ids (0 when unseen)."""
        found, pos = _lookup(self.codes, _whole_codes(np.array([ngram], dtype=np.uint64), self.n))
        return int(self.counts[pos[0]]) if found[0] else 0

    def ngrams(self):
        """The n-grams as a (K, n) int32 matrix of token ids, zero-padded on the right."""
        bits = _bits(self.n)
        mask = np.uint64((1 << bits) - 1)
        return np.stack([(self.codes >> np.uint64(bits * j)) & mask for j in range(self.n)], axis=1).astype(np.int32)

    def save(self, path):
        """Write the .npz atomically (a Snakemake output exists complete or not at all)."""
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
                arrays = {"ngrams": self.ngrams(), "counts": self.counts, "num_docs": np.int64(self.num_docs)}
                np.savez(f, **arrays, **({"end_token": np.int64(END_TOKEN)} if self.end_token else {}))

    @classmethod
    def load(cls, path, end_token=False):
        """The df of a .npz. end_token=False: without the n-grams that contain the end token
        (SCST's no_eos mode, evolution strategies); True: with them (SCST's standard mode),
        refused for a file counted without it."""
        with np.load(path, allow_pickle=False) as f:
            missing = {"ngrams", "counts", "num_docs"} - set(f.files)
            if missing:
                raise CaptionflowError(f"{path}: not a document-frequency file (missing {', '.join(sorted(missing))})")
            ngrams, counts, num_docs = f["ngrams"], f["counts"], int(f["num_docs"])
            end = int(f["end_token"]) if "end_token" in f.files else None
        if end_token and end != END_TOKEN:
            raise CaptionflowError(
                f"{path} counts no end token (written before scst.eos_mode existed), which scst.eos_mode standard "
                "needs: delete it and rerun (rule prepro_cider_df rewrites it), or set scst.eos_mode: no_eos"
            )
        if end is not None and not end_token:
            keep = ~(ngrams == end).any(axis=1)
            ngrams, counts = ngrams[keep], counts[keep]
        codes = _whole_codes(ngrams, ngrams.shape[1])
        order = np.argsort(codes)
        return cls(codes[order], counts[order], num_docs, ngrams.shape[1], end_token=end_token)


def document_frequencies(docs, n=4, end_token=False):
    """df of each 1..n-gram over `docs`, as pycocoevalcap counts it.

    docs: a list (one per image) of lists of references, each a sequence of int token ids.
    An n-gram's df is the number of images with at least one reference containing it.
    end_token: count each reference with END_TOKEN appended.
    """
    refs = [ref for doc in docs for ref in doc]
    doc_of_ref = np.repeat(np.arange(len(docs)), [len(doc) for doc in docs])
    mat, lengths = _pack(refs)
    if end_token:
        mat, lengths = with_end_token(mat, lengths)
    codes, seq = _ngram_codes(mat, lengths, n)
    return DocumentFrequencies(*_doc_counts(codes, doc_of_ref[seq]), num_docs=len(docs), n=n, end_token=end_token)


def document_frequencies_from_labels(labels_h5, labels_json, split="train", n=4, end_token=True):
    """df of one split's reference captions exactly as the labels HDF5 stores them.

    Same vocabulary, UNK and truncation as the captions a model is trained on, so the
    SCST reward's idf weighs the words the model can actually produce. end_token: each
    reference (truncated ones too) counted with END_TOKEN appended, for SCST's standard
    mode; `DocumentFrequencies.load` leaves those n-grams out for the no_eos mode.
    """
    images = read_labels_json(labels_json)["images"]
    with open_h5(labels_h5, "labels", RELABEL) as f:
        require_datasets(f, labels_h5, "labels", ("labels", "label_start_ix", "label_end_ix"), RELABEL)
        labels = f["labels"][:]
        start, end = f["label_start_ix"][:], f["label_end_ix"][:]
    if len(images) != len(start):
        raise CaptionflowError(f"{labels_json} lists {len(images)} images but {labels_h5} indexes {len(start)}")
    chosen = np.array([i for i, img in enumerate(images) if img["split"] == split], dtype=np.int64)
    if not len(chosen):
        raise CaptionflowError(f"{labels_json}: no images in split {split!r} to count document frequencies over")
    counts = (end[chosen] - start[chosen] + 1).astype(np.int64)  # captions per image
    doc_of_row = np.repeat(np.arange(len(chosen)), counts)
    rows = _ranges(start[chosen].astype(np.int64) - 1, counts)  # 1-based inclusive -> 0-based rows
    mat, lengths = _pack(labels[rows])
    if mat.size and int(mat.max()) >= END_TOKEN:
        raise CaptionflowError(f"{labels_h5}: word id {int(mat.max())} reaches the end token's id {END_TOKEN}")
    if end_token:
        mat, lengths = with_end_token(mat, lengths)
    codes, seq = _ngram_codes(mat, lengths, n)
    return DocumentFrequencies(*_doc_counts(codes, doc_of_row[seq]), num_docs=len(chosen), n=n, end_token=end_token)


def write_training_df(labels_h5, labels_json, out, end_token=True):
    """Stage prepro_cider_df: the training split's document frequencies -> `out` (.npz).

    end_token: count the end token (what scst.eos_mode standard needs; no_eos and ES read
    the same file without its n-grams). The rule passes it as a param, so a df file written
    before the end token was counted is rebuilt by the next run instead of refused."""
    df = document_frequencies_from_labels(labels_h5, labels_json, split="train", end_token=end_token)
    df.save(out)
    print(
        f"document frequencies of {len(df)} n-grams (n = 1..{df.n}, the end token "
        f"{'counted' if end_token else 'not counted'}) over {df.num_docs} "
        f"training images -> {out}",
        flush=True,
    )


class CiderD:
    """CIDEr-D of token-id hypotheses against references cooked once.

    refs: {key: [reference token-id sequences]}. df=None: corpus mode, df from these
    references (pycocoevalcap's `Cider` when every key is scored once); df=a
    `DocumentFrequencies`: training mode (the SCST reward). n: the largest n-gram order;
    pycocoevalcap itself only works with its default 4 (it always cooks 1..4-grams).

    Cooked state, for R references of I keys and a vocabulary of K n-gram codes (every
    reference n-gram, plus the DF's in training mode):
        _vocab (K,) sorted codes, _idf (K,)
        _ref_g (U,) vocabulary index, _ref_vec (U,) tf-idf: the distinct n-grams of each
            reference, reference r's at _ref_entry[r]:_ref_entry[r + 1], sorted
        _ref_norm (R, n), _ref_len (R,); _first_ref (I,), _num_refs (I,): refs by key
    """

    def __init__(self, refs, df=None, n=4, sigma=6.0):
        if not refs:
            raise CaptionflowError("CIDEr-D needs references for at least one image")
        if df is not None and df.n != n:
            raise CaptionflowError(f"document frequencies were counted for n={df.n}, CIDEr-D uses n={n}")
        empty = next((key for key, r in refs.items() if not len(r)), None)
        if empty is not None:
            raise CaptionflowError(f"image {empty!r} has no reference captions")
        self.n, self.sigma = n, float(sigma)
        self._key_index = {key: i for i, key in enumerate(refs)}
        self._num_refs = np.array([len(r) for r in refs.values()], dtype=np.int64)
        self._first_ref = np.cumsum(self._num_refs) - self._num_refs
        mat, lengths = _pack([ref for r in refs.values() for ref in r])
        num_refs = len(mat)
        ngrams, ref, index, tf = _distinct(*_ngram_codes(mat, lengths, n))
        if df is None:
            key_of_ref = np.repeat(np.arange(len(refs)), self._num_refs)
            self._vocab, g = ngrams, index
            doc_freq = _count_docs(key_of_ref[ref], index, len(ngrams))
            num_docs = len(refs)
        else:
            self._vocab = _sorted_unique(np.concatenate([df.codes, ngrams]))
            g = np.searchsorted(self._vocab, ngrams)[index]
            found, pos = _lookup(df.codes, self._vocab)
            doc_freq = np.where(found, df.counts[pos], 0)
            num_docs = df.num_docs
        if not len(self._vocab):
            raise CaptionflowError("every reference caption is empty: CIDEr-D has no n-grams to weigh")
        self._log_docs = np.log(float(num_docs))
        self._idf = self._log_docs - np.log(np.maximum(1.0, doc_freq))
        self._ref_g = g
        self._ref_vec = tf * self._idf[g]
        self._ref_entry = np.concatenate([[0], np.cumsum(np.bincount(ref, minlength=num_refs))])
        self._ref_norm = self._norms(ref, _order(ngrams, n)[index], self._ref_vec, num_refs)
        self._ref_len = self._length(lengths)

    @staticmethod
    def _length(lengths):
        """pycocoevalcap's caption length: its number of bigrams, max(len - 1, 0)."""
        return np.maximum(lengths - 1, 0)

    def _norms(self, seq, order, vec, num):
        """Euclidean norm of each sequence's tf-idf vector per order: -> (num, n)."""
        sq = np.bincount(seq * self.n + order, weights=vec * vec, minlength=num * self.n)
        return np.sqrt(sq.astype(np.float64)).reshape(num, self.n)

    def score(self, keys, hyps):
        """CIDEr-D of each hypothesis against its image's references.

        keys: N image keys (repeat a key for several samples of one image). hyps: N
        token-id sequences, a list or a zero-padded (N, T) int array/tensor; each stops at
        its first 0. -> (N,) float64. An empty hypothesis scores 0.
        """
        try:
            key_ix = np.array([self._key_index[k] for k in keys], dtype=np.int64)  # (N,)
        except KeyError as exc:
            raise CaptionflowError(f"no reference captions for image {exc.args[0]!r}") from None
        mat, lengths = _pack(hyps)
        if len(mat) != len(key_ix):
            raise CaptionflowError(f"{len(key_ix)} image keys but {len(mat)} hypotheses")
        num, n, width = len(mat), self.n, len(self._vocab)

        # Hypothesis tf-idf: the batch's distinct n-grams are looked up in the vocabulary
        # once (sorted queries, so the search stays fast on a corpus-sized vocabulary).
        ngrams, hyp, index, tf = _distinct(*_ngram_codes(mat, lengths, n))  # entries (E,)
        known, g = _lookup(self._vocab, ngrams)  # (V,)
        idf = np.where(known, self._idf[g], self._log_docs)  # an unseen n-gram counts df 1
        vec = tf * idf[index]  # (E,)
        order = _order(ngrams, n)[index]  # (E,)
        hyp_norm = self._norms(hyp, order, vec, num)  # (N, n)

        # The batch's images and their references, numbered locally: image b has local
        # references local_first[b] .. + refs_per_image[b] - 1, global ones local_refs[...].
        images, image_of_hyp = np.unique(key_ix, return_inverse=True)  # (B,), (N,)
        refs_per_image = self._num_refs[images]
        local_first = np.cumsum(refs_per_image) - refs_per_image
        local_refs = _ranges(self._first_ref[images], refs_per_image)  # (R_b,)

        # Slots: the distinct known n-grams among each image's hypotheses. A small dense
        # table (R_b, slots per image) holds each local reference's tf-idf for them, so the
        # join below is a gather instead of a search per (n-gram, reference).
        e = np.nonzero(known[index])[0]  # hypothesis entries that a reference may contain
        slots, slot_of_e = np.unique(image_of_hyp[hyp[e]] * width + g[index[e]], return_inverse=True)
        slot_image = slots // width
        rank = (
            np.arange(len(slots)) - np.searchsorted(slot_image, np.arange(len(images)))[slot_image]
        )  # within its image
        table = np.zeros((len(local_refs), int(rank.max(initial=0)) + 1))
        counts = self._ref_entry[local_refs + 1] - self._ref_entry[local_refs]
        entries = _ranges(self._ref_entry[local_refs], counts)  # the local refs' n-grams
        entry_local_ref = np.repeat(np.arange(len(local_refs)), counts)
        entry_image = np.repeat(np.repeat(np.arange(len(images)), refs_per_image), counts)
        found, pos = _lookup(slots, entry_image * width + self._ref_g[entries])
        table[entry_local_ref[found], rank[pos[found]]] = self._ref_vec[entries[found]]

        # (hypothesis, reference) pairs: hypothesis h meets each reference of its image.
        pairs_per_hyp = refs_per_image[image_of_hyp]  # (N,)
        pair_start = np.cumsum(pairs_per_hyp) - pairs_per_hyp
        pair_hyp = np.repeat(np.arange(num), pairs_per_hyp)  # (P,)
        pair_local_ref = local_first[image_of_hyp][pair_hyp] + np.arange(len(pair_hyp)) - pair_start[pair_hyp]
        pair_ref = local_refs[pair_local_ref]  # (P,) global reference index

        # Join: every known hypothesis n-gram, once per pair of its hypothesis: (J,).
        reps = pairs_per_hyp[hyp[e]]
        pair = _ranges(pair_start[hyp[e]], reps)
        joined = np.repeat(np.arange(len(e)), reps)
        ref_vec = table[pair_local_ref[pair], rank[slot_of_e.reshape(-1)[joined]]]
        hyp_vec = vec[e][joined]
        clipped = np.minimum(hyp_vec, ref_vec) * ref_vec  # CIDEr-D's clipped counts
        dot = np.bincount(pair * n + order[e][joined], weights=clipped, minlength=len(pair_hyp) * n)
        dot = dot.astype(np.float64).reshape(len(pair_hyp), n)

        denom = hyp_norm[pair_hyp] * self._ref_norm[pair_ref]  # (P, n)
        sim = np.divide(dot, denom, out=dot.copy(), where=denom != 0)  # a zero norm leaves dot, which is 0
        delta = (self._length(lengths)[pair_hyp] - self._ref_len[pair_ref]).astype(np.float64)
        sim *= np.exp(-(delta**2) / (2 * self.sigma**2))[:, None]
        per_pair = sim.mean(axis=1)  # (P,) mean over n-gram orders
        return 10.0 * np.bincount(pair_hyp, weights=per_pair, minlength=num) / np.maximum(pairs_per_hyp, 1)

    def corpus_score(self, keys, hyps):
        """Mean CIDEr-D over the hypotheses, like the first value of `Cider.compute_score`."""
        return float(np.mean(self.score(keys, hyps)))
