"""Benchmark an XE training step: torchrun with N processes (DDP) against one process.

    python bench/bench_ddp.py [--model show_attend_tell] [--batch 50] [--steps 30] [--processes 2] [--device cpu]

Synthetic features and captions of the demo's shapes. The global batch is the same in both
runs (each of N ranks takes batch/N captions, as train_xe does), so the ratio is the
speed-up of one optimizer step. On the CPU each process gets threads/N intra-op threads
(the job's CPUs are shared); with --device cuda each process drives one GPU (nccl).
"""

import argparse
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from captionflow.models import create_model
from captionflow.training import distributed
from captionflow.training.losses import smoothed_nll


def steps_per_second(args):
    """Time `args.steps` XE steps (after 3 warm-up steps) in this process (or this rank)."""
    device = distributed.device_for(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, args.threads // distributed.world_size()))
    torch.manual_seed(0)
    model = create_model(args.model, vocab_size=args.vocab, feat_dim=args.feat_dim).to(device)
    net = distributed.wrap(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    share = distributed.shard(list(range(args.batch)))
    g = torch.Generator().manual_seed(1)
    att = torch.randn(args.batch, args.regions, args.feat_dim, generator=g)
    feats = {"att": att[share].to(device), "fc": att[share].mean(1).to(device)}
    tokens = torch.randint(1, args.vocab + 1, (args.batch, args.length + 1), generator=g)[share].to(device)
    inputs, targets = tokens[:, :-1].clone(), tokens[:, 1:]
    inputs[:, 0] = 0
    mask = torch.ones_like(targets, dtype=torch.float)

    def step():
        logprobs, aux = net(feats, inputs)
        loss = smoothed_nll(logprobs, targets, mask, 0.1) + model.aux_loss(aux, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    distributed.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    distributed.barrier()
    return args.steps / (time.perf_counter() - started)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="show_attend_tell")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--vocab", type=int, default=80)
    p.add_argument("--regions", type=int, default=16)
    p.add_argument("--feat-dim", type=int, default=512)
    p.add_argument("--length", type=int, default=12)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:  # one rank under torchrun
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        rate = steps_per_second(args)
        if distributed.is_main():
            print(f"RATE {rate}", flush=True)
        dist.destroy_process_group()
        return

    single = steps_per_second(args)
    argv = [a for a in sys.argv[1:]]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.processes}",
        os.path.abspath(__file__),
        *argv,
        "--worker",
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    multi = float(next(line.split()[1] for line in out.splitlines() if line.startswith("RATE")))
    print(f"XE step, {args.model}, global batch {args.batch}, device {args.device}, {args.threads} threads in all:")
    print(f"  1 process            {single:7.2f} steps/s ({1000 / single:6.1f} ms/step)")
    print(f"  {args.processes} processes (DDP)  {multi:7.2f} steps/s ({1000 / multi:6.1f} ms/step)")
    print(f"  ratio DDP / single: {multi / single:.2f}x")


if __name__ == "__main__":
    main()
