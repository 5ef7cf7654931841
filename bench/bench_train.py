"""Benchmark XE training tokens/s, decoding images/s (greedy, beam 3, beam 5), an SCST step.

    python bench/bench_train.py [--vocab 80] [--regions 16] [--feat-dim 512] [--hidden 256]

Synthetic features and captions of the given shapes (defaults: the demo's); caption
lengths drawn around COCO's mean of ~10 words. Every model in the registry is measured in
the same run on the same inputs; greedy decoding is the reference the beams are compared to.
Then one SCST step per model (batch images x 5 samples, 5 references each, DF of a
synthetic 5000-image corpus), broken down into sampling, reward and backward.
"""

import argparse
import time

import torch

from captionflow.decoding.search import beam_search, greedy, sample
from captionflow.metrics.cider import CiderD, document_frequencies
from captionflow.models import MODELS, create_model
from captionflow.training.losses import smoothed_nll


def _time(fn, repeats):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=80)
    p.add_argument("--regions", type=int, default=16)
    p.add_argument("--feat-dim", type=int, default=512)
    p.add_argument("--embed", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    att = torch.randn(args.batch, args.regions, args.feat_dim, generator=g)
    feats = {"att": att, "fc": att.mean(1)}
    lengths = torch.randint(7, 14, (args.batch,), generator=g)  # mean ~10 words
    T = int(lengths.max()) + 1
    targets = torch.randint(1, args.vocab + 1, (args.batch, T), generator=g)
    mask = (torch.arange(T)[None] <= lengths[:, None]).float()
    targets = targets * (torch.arange(T)[None] < lengths[:, None])
    inputs = torch.cat([torch.zeros(args.batch, 1, dtype=torch.long), targets[:, :-1]], dim=1)
    tokens = int(mask.sum())
    eatt = torch.randn(args.images, args.regions, args.feat_dim, generator=g)
    efeats = {"att": eatt, "fc": eatt.mean(1)}
    print(f"vocab {args.vocab}, {args.regions} regions x {args.feat_dim}, hidden {args.hidden}, {args.threads} threads")
    print(f"{'model':18} {'XE tokens/s':>12} {'greedy img/s':>13} {'beam3 img/s':>12} {'beam5 img/s':>12}")
    for name in sorted(MODELS):
        torch.manual_seed(0)
        kw = {"embed_size": args.embed, "hidden_size": args.hidden}
        model = create_model(name, vocab_size=args.vocab, feat_dim=args.feat_dim, **kw)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            model.train()
            logprobs, aux = model.teacher_forcing(feats, inputs)
            loss = smoothed_nll(logprobs, targets, mask, 0.1) + model.aux_loss(aux, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()

        train_s = _time(step, args.repeats)
        model.eval()
        dec = {
            "greedy": _time(lambda: greedy(model, efeats, 16), args.repeats),
            "beam3": _time(lambda: beam_search(model, efeats, 3, 16), args.repeats),
            "beam5": _time(lambda: beam_search(model, efeats, 5, 16), args.repeats),
        }
        n = args.images
        print(
            f"{name:18} {tokens / train_s:12.0f} {n / dec['greedy']:13.1f} {n / dec['beam3']:12.1f} {n / dec['beam5']:12.1f}"
            f"   (beam3 {dec['beam3'] / dec['greedy']:.1f}x, beam5 {dec['beam5'] / dec['greedy']:.1f}x greedy's time)"
        )
    scst_step(args)


def scst_step(args, samples=5):
    """Time sampling (with gradients), CIDEr-D reward and backward of one SCST step."""
    g = torch.Generator().manual_seed(1)

    def captions(n):
        return [
            torch.randint(1, args.vocab + 1, (int(torch.randint(7, 14, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)
        ]

    corpus = [captions(5) for _ in range(5000)]
    cider = CiderD({i: corpus[i] for i in range(args.batch)}, df=document_frequencies(corpus))
    att = torch.randn(args.batch, args.regions, args.feat_dim, generator=g)
    feats = {"att": att, "fc": att.mean(1)}
    keys = [i for i in range(args.batch) for _ in range(samples)]
    print(f"\nSCST step: {args.batch} images x {samples} samples, max 16 words (best of {args.repeats})")
    print(f"{'model':18} {'sample ms':>10} {'reward ms':>10} {'backward ms':>12}")
    for name in sorted(MODELS):
        torch.manual_seed(0)
        model = create_model(
            name, vocab_size=args.vocab, feat_dim=args.feat_dim, embed_size=args.embed, hidden_size=args.hidden
        ).train()
        best = {"sample": 1e9, "reward": 1e9, "backward": 1e9}
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            seqs, token_lp = sample(
                model, feats, n=samples, max_len=16, generator=torch.Generator().manual_seed(0), track_grad=True
            )
            t1 = time.perf_counter()
            hyps = [row[: row.index(0)] if 0 in row else row for row in seqs.tolist()]
            rewards = torch.as_tensor(cider.score(keys, hyps), dtype=torch.float32).view(-1, samples)
            baseline = (rewards.sum(1, keepdim=True) - rewards) / (samples - 1)
            t2 = time.perf_counter()
            loss = -((rewards - baseline).view(-1) * token_lp.sum(1)).mean()
            model.zero_grad()
            loss.backward()
            t3 = time.perf_counter()
            for k, v in (("sample", t1 - t0), ("reward", t2 - t1), ("backward", t3 - t2)):
                best[k] = min(best[k], v)
        print(f"{name:18} {best['sample'] * 1e3:10.1f} {best['reward'] * 1e3:10.1f} {best['backward'] * 1e3:12.1f}")


if __name__ == "__main__":
    main()
