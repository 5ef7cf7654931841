"""Benchmark the SCST reward: CiderD.score against pycocoevalcap's CiderScorer on the same batches.

    python bench/bench_cider.py [--train-images 5000] [--batches 20] [--repeats 5]

A synthetic COCO-like training corpus: a 10k-word vocabulary drawn Zipf-like (so common
words and n-grams recur, as in captions), 5 references per image, lengths uniform in
7..13 (mean 10). Its document frequencies are the reward's DF, and CiderD cooks all its
references once, as an SCST run does before training. Each batch is 50 images x 5
sampled captions (noisy copies of a reference, 7..13 tokens) as a zero-padded (250, T)
int64 tensor, the form a sampler returns.

pycocoevalcap's side is what ruotianluo's SCST reward does per batch: a CiderScorer built
from the 250 hypotheses and their references (strings prepared beforehand, not timed),
given the same training DF (its document_frequency, and ref_len through len(crefs)), and
scored with compute_cider. Both must give the same scores; goal: >= 20x faster.
"""

import argparse
import statistics
import time
from collections import defaultdict

import numpy as np
import torch
from pycocoevalcap.cider.cider_scorer import CiderScorer

from captionflow.metrics.cider import CiderD, document_frequencies

VOCAB = 10_000
REFS_PER_IMAGE = 5
IMAGES_PER_BATCH = 50
SAMPLES_PER_IMAGE = 5


def zipf_words(rng, size):
    """Word ids 1..VOCAB with p(rank r) ~ 1 / r: a caption vocabulary's long tail."""
    p = 1.0 / np.arange(1, VOCAB + 1)
    return rng.choice(np.arange(1, VOCAB + 1), size=size, p=p / p.sum())


def make_corpus(rng, num_images):
    """{image: [5 references of 7..13 word ids]}."""
    return {
        i: [zipf_words(rng, int(rng.integers(7, 14))).tolist() for _ in range(REFS_PER_IMAGE)]
        for i in range(num_images)
    }


def make_batch(rng, corpus):
    """50 images x 5 samples: each a reference with ~30% of its words resampled, 7..13 long."""
    images = rng.choice(len(corpus), size=IMAGES_PER_BATCH, replace=False)
    keys, hyps = [], []
    for image in images:
        for _ in range(SAMPLES_PER_IMAGE):
            ref = corpus[int(image)][int(rng.integers(REFS_PER_IMAGE))]
            length = int(rng.integers(7, 14))
            hyp = np.resize(np.array(ref), length)
            noise = rng.random(length) < 0.3
            hyp[noise] = zipf_words(rng, int(noise.sum()))
            keys.append(int(image))
            hyps.append(hyp.tolist())
    padded = torch.zeros(len(hyps), 16, dtype=torch.int64)  # (250, T), 0 after each caption
    for i, h in enumerate(hyps):
        padded[i, : len(h)] = torch.tensor(h)
    return keys, hyps, padded


class CorpusOfSize(list):
    """Cooked references whose len() is the training corpus size.

    CiderScorer.compute_cider sets ref_len = log(len(self.crefs)); this makes it the
    log of the training DF's document count instead of the batch size.
    """

    def __init__(self, items, num_docs):
        super().__init__(items)
        self.num_docs = num_docs

    def __len__(self):
        return self.num_docs


def pycocoevalcap_reward(hyp_strings, ref_strings, df_dict, num_docs):
    """ruotianluo-style CIDEr-D reward: cook the batch, score it against a fixed DF. -> (N,)"""
    scorer = CiderScorer(n=4, sigma=6.0)
    for hyp, refs in zip(hyp_strings, ref_strings):
        scorer += (hyp, refs)
    scorer.document_frequency = df_dict  # unseen n-grams get inserted as 0.0: same result
    scorer.crefs = CorpusOfSize(scorer.crefs, num_docs)
    return np.array(scorer.compute_cider())


def best_ms(fn, repeats):
    """Best wall time of `repeats` calls, in milliseconds, and the last result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=5000)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)

    corpus = make_corpus(rng, args.train_images)
    start = time.perf_counter()
    df = document_frequencies(list(corpus.values()))
    df_s = time.perf_counter() - start
    start = time.perf_counter()
    cider = CiderD(corpus, df=df)
    cook_s = time.perf_counter() - start

    def word(ids):
        return " ".join(str(t) for t in ids)

    df_dict = defaultdict(float, {tuple(str(t) for t in row if t): float(c) for row, c in zip(df.ngrams(), df.counts)})
    print(
        f"training corpus: {args.train_images} images x {REFS_PER_IMAGE} refs, vocab {VOCAB}, "
        f"{len(df)} distinct n-grams; DF {1000 * df_s:.0f} ms, CiderD cooking all refs once {1000 * cook_s:.0f} ms"
    )
    print(
        f"batch: {IMAGES_PER_BATCH} images x {SAMPLES_PER_IMAGE} samples = {IMAGES_PER_BATCH * SAMPLES_PER_IMAGE} hypotheses; "
        "reference: pycocoevalcap CiderScorer per batch with the same training DF"
    )

    ours_ms, theirs_ms, max_diff, mean_reward = [], [], 0.0, []
    for _ in range(args.batches):
        keys, hyps, padded = make_batch(rng, corpus)
        hyp_strings = [word(h) for h in hyps]
        ref_strings = [[word(r) for r in corpus[k]] for k in keys]
        ms, ours = best_ms(lambda: cider.score(keys, padded), args.repeats)
        ours_ms.append(ms)
        ms, theirs = best_ms(
            lambda: pycocoevalcap_reward(hyp_strings, ref_strings, df_dict, df.num_docs), max(1, args.repeats // 2)
        )
        theirs_ms.append(ms)
        max_diff = max(max_diff, float(np.abs(ours - theirs).max()))
        mean_reward.append(float(ours.mean()))

    ours_med, theirs_med = statistics.median(ours_ms), statistics.median(theirs_ms)
    print(
        f"CiderD.score          {ours_med:8.2f} ms per batch (median over {args.batches} batches of the best of {args.repeats})"
    )
    print(f"pycocoevalcap CIDEr-D {theirs_med:8.2f} ms per batch")
    print(f"speed-up              {theirs_med / ours_med:8.1f}x (goal >= 20x)")
    print(f"max |diff| of scores  {max_diff:.2e} (mean reward {statistics.mean(mean_reward):.3f})")
    if max_diff > 1e-6:
        raise SystemExit(f"scores differ from pycocoevalcap by {max_diff:.2e}")


if __name__ == "__main__":
    main()
