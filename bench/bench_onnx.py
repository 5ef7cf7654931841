"""Benchmark captioning images/s on the CPU: PyTorch against the ONNX export on onnxruntime.

    python bench/bench_onnx.py [--model show_attend_tell] [--images 64] [--batch 16] [--beam 3] [--threads 2]

The demo's setting: 128 x 128 demo scenes, a random-init resnet18 grid (4 x 4 x 512), the
demo experiment's model sizes and a 75-word vocabulary. The same model and images run in
PyTorch and through export_onnx's graphs (backbone + encoder in one graph, then one step per
word), in the same run. Stages: "encoder" is uint8 images -> init_state (backbone included),
"decoding" beam search from that state; the end token is forbidden, so every search runs
all --max-len steps on both sides and the work is the same. The last line says how many
captions both picked alike.
"""

import argparse
import random
import tempfile
import time

import numpy as np
import torch

from captionflow.data.demo import make_scene, render_scene
from captionflow.decoding.search import ForbidEnd, beam_search
from captionflow.deploy.onnx import OnnxCaptioner, export_onnx
from captionflow.features.backbones import GridFeatures, create_backbone
from captionflow.models import create_model

DEMO_ARGS = {  # config.yaml's experiments; other models get the same widths
    "show_attend_tell": {"embed_size": 128, "hidden_size": 256, "att_size": 128, "dropout": 0.3},
    "fc": {"embed_size": 128, "hidden_size": 256, "dropout": 0.3},
}


class FromState(torch.nn.Module):
    """`model` whose init_state hands back a state computed beforehand (to time decoding alone)."""

    def __init__(self, model, state):
        super().__init__()
        self.model, self.state = model, state
        self.image_state = model.image_state

    def init_state(self, feats):
        return self.state

    def step(self, tokens, state):
        return self.model.step(tokens, state)


def _timed(fn):
    fn()  # warm-up (onnxruntime's first run plans its memory)
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def run(encode, model, batches, beam, max_len):
    """-> (encoder seconds, decoding seconds, tokens) over all batches."""
    enc = dec = 0.0
    seqs = []
    for images in batches:
        t, state = _timed(lambda: encode(images))
        enc += t
        decoder = ForbidEnd(FromState(model, state))
        t, (tokens, _) = _timed(lambda: beam_search(decoder, {"images": images}, beam_size=beam, max_len=max_len))
        dec += t
        seqs.append(tokens)
    return enc, dec, torch.cat(seqs)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="show_attend_tell")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--max-len", type=int, default=16)
    p.add_argument("--vocab", type=int, default=75)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    images = torch.stack(
        [
            torch.from_numpy(
                np.array(render_scene(make_scene(random.Random(i)), args.size, np.random.default_rng(i)))
            ).permute(2, 0, 1)
            for i in range(args.images)
        ]
    )
    batches = images.split(args.batch)
    backbone = GridFeatures(create_backbone("resnet18", weights="none", seed=0)).eval()
    torch.manual_seed(0)
    kw = DEMO_ARGS.get(args.model, {"embed_size": 128, "hidden_size": 256})
    model = create_model(args.model, vocab_size=args.vocab, feat_dim=backbone.backbone.out_dim, **kw).eval()
    with torch.no_grad():
        att, fc = backbone(images[: args.batch])
        model.fit_feature_norms({"att": att, "fc": fc})

    def torch_encode(x):
        with torch.no_grad():
            att, fc = backbone(x)
            return model.init_state({"att": att, "fc": fc})

    with tempfile.TemporaryDirectory() as folder:
        t = time.perf_counter()
        export_onnx(model, folder, encoder=backbone, image_size=args.size)
        export_s = time.perf_counter() - t
        onnx = OnnxCaptioner(folder, threads=args.threads)
        results = {
            "pytorch": run(torch_encode, model, batches, args.beam, args.max_len),
            "onnxruntime": run(onnx.init_state, onnx, batches, args.beam, args.max_len),
        }

    n = args.images
    print(
        f"{args.model}, {n} images {args.size}px in batches of {args.batch}, beam {args.beam}, {args.max_len} steps, "
        f"{args.threads} threads (export took {export_s:.1f} s)"
    )
    print(f"{'':12} {'encoder img/s':>14} {'decoding img/s':>15} {'total img/s':>12}")
    rates = {}
    for name, (enc, dec, _) in results.items():
        rates[name] = (n / enc, n / dec, n / (enc + dec))
        print(f"{name:12} {rates[name][0]:14.1f} {rates[name][1]:15.1f} {rates[name][2]:12.1f}")
    ratio = [o / p for o, p in zip(rates["onnxruntime"], rates["pytorch"])]
    print(f"{'ratio ort/pt':12} {ratio[0]:13.2f}x {ratio[1]:14.2f}x {ratio[2]:11.2f}x")
    same = (results["pytorch"][2] == results["onnxruntime"][2]).all(dim=1).sum().item()
    print(f"same captions: {same} of {n}")


if __name__ == "__main__":
    main()
