"""Benchmark beam search with the decoder key/value cache against re-decoding the prefix.

    python bench/bench_kv_cache.py [--batch 16] [--beam 5] [--steps 20] [--d-model 512] [--layers 3]

For `transformer` and `expansionnet_v2` (d_model 512, 3 + 3 layers, the paper sizes), one
model each, decodes the same random region features twice with beam search: with the cache
(`use_cache = True`, each step projects only the new word) and without it (`use_cache =
False`, each step re-decodes the whole prefix through every layer). Every search runs exactly
--steps steps: the end token is forbidden (its log-probability set to -inf), so no beam
finishes early and both variants do the same number of steps on every repeat. Times are
per batch and include init_state (the encoder and the cross-attention keys/values), which
both variants share and which is also timed alone; "steps only" is the speed-up with it
subtracted. The last column says whether both searches picked the same tokens.
"""

import argparse

import torch
from bench_train import _time  # best of `repeats` after a warm-up (bench/ is on sys.path)

from captionflow.decoding.search import ForbidEnd, beam_search
from captionflow.models import create_model


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--vocab", type=int, default=10000)
    p.add_argument("--regions", type=int, default=49)
    p.add_argument("--feat-dim", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    att = torch.randn(args.batch, args.regions, args.feat_dim, generator=g)
    feats = {"att": att, "fc": att.mean(dim=1)}
    sizes = {
        "vocab_size": args.vocab,
        "feat_dim": args.feat_dim,
        "embed_size": args.d_model,
        "hidden_size": 4 * args.d_model,
    }
    models = {
        "transformer": {"n_layers": args.layers},
        "expansionnet_v2": {"n_enc_layers": args.layers, "n_dec_layers": args.layers},
    }
    print(
        f"beam {args.beam}, {args.steps} steps, batch {args.batch}, {args.regions} regions x {args.feat_dim}, "
        f"vocab {args.vocab}, d_model {args.d_model}, {args.layers} + {args.layers} layers, {args.threads} threads, "
        f"best of {args.repeats}"
    )
    print(
        f"{'model':16} {'cached ms':>10} {'uncached ms':>12} {'speed-up':>9} {'init ms':>8} {'steps only':>11}  same tokens"
    )
    for name, options in models.items():
        torch.manual_seed(0)
        model = create_model(name, **sizes, **options, dropout=0.0).eval()
        wrapped = ForbidEnd(model)
        results, times = {}, {}
        for use_cache in (True, False):
            model.use_cache = use_cache

            def search():
                results[use_cache] = beam_search(wrapped, feats, beam_size=args.beam, max_len=args.steps)

            times[use_cache] = 1000 * _time(search, args.repeats)
        with torch.no_grad():
            init = 1000 * _time(lambda: model.init_state(feats), args.repeats)
        assert results[True][0].shape[1] == args.steps
        same = torch.equal(results[True][0], results[False][0])
        ratio = times[False] / times[True]
        steps_ratio = (times[False] - init) / (times[True] - init)
        print(
            f"{name:16} {times[True]:10.0f} {times[False]:12.0f} {ratio:8.1f}x {init:8.0f} {steps_ratio:10.1f}x  {same}"
        )


if __name__ == "__main__":
    main()
