"""Benchmark end-to-end training (backbone + captioner): images/s and peak memory.

    python bench/bench_e2e.py [--sizes 128 224] [--batch 16] [--device cpu|cuda]

One finetune_e2e step (forward through the backbone and captioner with 5 captions per
image, backward, AdamW) on random images and captions, as the stage runs it. On the CPU
the peak is the process's maximum resident memory; on CUDA, torch's peak allocation, and
the step is timed with and without bf16 autocast.
"""

import argparse
import resource
import time

import torch

from captionflow.features.backbones import Backbone, freeze_leading_stages
from captionflow.models import create_model
from captionflow.training.losses import smoothed_nll


def step_fn(features, captioner, optimizer, images, inputs, targets, mask, device, amp):
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            att, fc = features(images)
            feats = {"att": att.float().repeat_interleave(5, 0), "fc": fc.float().repeat_interleave(5, 0)}
            logprobs, aux = captioner.teacher_forcing(feats, inputs)
        loss = smoothed_nll(logprobs.float(), targets, mask, 0.1) + captioner.aux_loss(aux, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    vocab, T = 80, 12
    print(f"{args.backbone} + show_attend_tell, {args.batch} images x 5 captions per step, device {device}")
    print(f"{'size':>5} {'amp':>5} {'img/s':>8} {'peak MB':>9}")
    for size in args.sizes:
        for amp in [False, True] if device.type == "cuda" else [False]:
            torch.manual_seed(0)
            features = Backbone(args.backbone, "none", 0, size, 0).build().to(device)
            freeze_leading_stages(features.backbone, 1)
            captioner = create_model(
                "show_attend_tell",
                vocab_size=vocab,
                feat_dim=features.backbone.out_dim,
                embed_size=128,
                hidden_size=256,
                att_size=128,
            ).to(device)
            params = [
                {"params": [q for q in features.parameters() if q.requires_grad], "lr": 1e-5},
                {"params": list(captioner.parameters()), "lr": 1e-4},
            ]
            optimizer = torch.optim.AdamW(params)
            features.train()
            captioner.train()
            images = torch.randint(0, 255, (args.batch, 3, size, size), dtype=torch.uint8, device=device)
            targets = torch.randint(1, vocab + 1, (args.batch * 5, T), device=device)
            inputs = torch.cat([torch.zeros_like(targets[:, :1]), targets[:, :-1]], dim=1)
            mask = torch.ones(args.batch * 5, T, device=device)
            step = step_fn(features, captioner, optimizer, images, inputs, targets, mask, device, amp)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            step()  # warm-up
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            rate = args.batch * args.steps / (time.perf_counter() - t)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated() / 2**20
            else:
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # running process peak
            print(f"{size:5d} {'bf16' if amp else 'off':>5} {rate:8.1f} {peak:9.0f}")


if __name__ == "__main__":
    main()
