"""Captioning raw images end to end with a bundle: PyTorch vs onnxruntime, same images, one run.

    .venv/bin/python bench/bench_caption.py [--bundle results/show_attend_tell/export]
        [--images results/demo/images] [--n 200] [--beam-size 3] [--device cpu|cuda]

Times each stage of `captionflow caption` per image: decode + resize (+ the JPEG round
trip the workflow's images had), encoder (backbone and the model's encoder, ending in the
decoder's initial state) and beam search; then the same on onnxruntime (CPU) through
OnnxCaptioner and the same search code. Prints images/s per stage and in total, the
ratios, and how many captions agree. Needs a bundle (`make demo` writes them).
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from captionflow.decoding.search import decode, to_words
from captionflow.deploy.captioner import Captioner
from captionflow.deploy.onnx import export_bundle


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run(captioner, prepared, beam, batch):
    """-> captions, seconds in the encoder, seconds decoding."""
    member = captioner.members[0]
    captions, t_enc, t_dec = [], 0.0, 0.0
    decoding = captioner.decoding
    for b in range(0, len(prepared), batch):
        images = torch.stack([p[member.preprocess] for p in prepared[b : b + batch]])
        with torch.no_grad():
            state, t = _timed(lambda: member.model.init_state(member.feats(images)))
            t_enc += t
            # decode from the computed state: init_state is called again by the search, so
            # give it a model whose init_state returns this state
            cached = _Given(member.model, state)
            (seqs, _), t = _timed(
                lambda: decode(
                    cached,
                    {"x": images},
                    "beam",
                    beam,
                    decoding["max_len"],
                    decoding["alpha"],
                    decoding["block_trigrams"],
                )
            )
            t_dec += t
        captions += to_words(seqs, captioner.ix_to_word)
    return captions, t_enc, t_dec


class _Given:
    """A model whose init_state is the state already computed (the search's input)."""

    def __init__(self, model, state):
        self.model, self.state = model, state
        self.image_state = getattr(model, "image_state", ())

    def init_state(self, feats):
        return self.state

    def step(self, tokens, state):
        return self.model.step(tokens, state)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", default="results/show_attend_tell/export")
    p.add_argument("--images", default="results/demo/images")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    files = sorted(Path(args.images).rglob("*.jpg"))[: args.n]
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    pt = Captioner(args.bundle, args.device)
    prepared, t_pre = _timed(lambda: [pt.images(f) for f in files])
    n = len(files)
    with tempfile.TemporaryDirectory() as tmp:
        export_bundle(args.bundle, tmp)
        ort = Captioner(args.bundle, "cpu", onnx=tmp)
        run(pt, prepared[: args.batch_size], args.beam_size, args.batch_size)  # warm-up
        run(ort, prepared[: args.batch_size], args.beam_size, args.batch_size)
        a, enc_a, dec_a = run(pt, prepared, args.beam_size, args.batch_size)
        b, enc_b, dec_b = run(ort, prepared, args.beam_size, args.batch_size)
    print(
        f"{n} images from {args.images}, bundle {args.bundle}, beam {args.beam_size}, batch {args.batch_size}, {threads} CPU threads, device {pt.device}"
    )
    print(f"  decode + resize + JPEG round trip: {n / t_pre:8.1f} img/s (both runtimes)")
    for name, enc, dec in (("PyTorch", enc_a, dec_a), ("onnxruntime", enc_b, dec_b)):
        total = t_pre + enc + dec
        print(
            f"  {name:<12} encoder {n / enc:8.1f} img/s, beam search {n / dec:8.1f} img/s, end to end {n / total:8.1f} img/s "
            f"(time: {100 * t_pre / total:.0f}% preprocessing, {100 * enc / total:.0f}% encoder, {100 * dec / total:.0f}% decoding)"
        )
    print(
        f"  onnxruntime / PyTorch: encoder {enc_a / enc_b:.2f}x, beam search {dec_a / dec_b:.2f}x, "
        f"end to end {(t_pre + enc_a + dec_a) / (t_pre + enc_b + dec_b):.2f}x"
    )
    print(f"  identical captions: {sum(x == y for x, y in zip(a, b))} of {n}")


if __name__ == "__main__":
    main()
