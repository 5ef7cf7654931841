"""Multi-process (DDP) training: one process per GPU under torchrun, gloo on the CPU.

A training stage (train_xe, train_scst) with `gpus: N > 1` calls `launch(train, N, **kwargs)`: the workflow script
starts `torchrun --standalone --nproc_per_node N -m captionflow.training.distributed SPEC`,
and each worker runs the same `train(**kwargs)`. Inside, the regime asks this module for
its rank and world size: every rank builds the epoch's global batch list from the same seed
and trains on its share of each batch (`shard`), gradients are averaged by DDP, so
`batch_size` is the global batch whatever N is. Rank 0 alone validates, logs and writes
checkpoints (`is_main`); it broadcasts the validation score so that every rank takes the
same early-stopping and learning-rate decisions. A SIGTERM reaches every worker; they agree
on it each step (`any_rank`) and stop together after rank 0 saved the state.
"""

import os
import pickle
import signal
import subprocess
import sys
import tempfile

import torch
import torch.distributed as dist

from captionflow.errors import CaptionflowError


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main():
    return rank() == 0


def device_for(device):
    """The device of this process: with several CUDA processes, the GPU of its local rank."""
    if world_size() > 1 and torch.device(device).type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(device)


def shard(batch):
    """This rank's share of a global batch. A batch smaller than the world (an epoch's last
    one) gives some ranks a repeated item: every rank must take part in each step."""
    share = batch[rank() :: world_size()]
    return share if share else batch[rank() % len(batch) : rank() % len(batch) + 1]


def wrap(model):
    """DistributedDataParallel around `model` when there are several processes."""
    if world_size() == 1:
        return model
    ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def average_gradients(model):
    """Average the gradients over the ranks, as DDP does, for regimes whose loss does not go
    through the model's forward() (SCST samples step by step). One collective per step."""
    if world_size() == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def sum_over_ranks(values):
    """values (N,) float64 on the CPU, each rank filling its own entries (zeros elsewhere)
    -> the sum on every rank, and the bytes this rank sent (0 in one process). ES gathers
    offspring fitnesses this way: N numbers a generation, never parameters."""
    if world_size() == 1:
        return values, 0
    t = values.to(_collective_device())
    dist.all_reduce(t)
    return t.cpu(), t.numel() * t.element_size()


def any_rank(flag):
    """True on every rank when `flag` is true on at least one (e.g. a SIGTERM seen)."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_float(value):
    """Rank 0's `value` on every rank (validation scores)."""
    if world_size() == 1:
        return value
    t = torch.tensor([float(value if value is not None else 0.0)], dtype=torch.float64, device=_collective_device())
    dist.broadcast(t, src=0)
    return t.item()


def barrier():
    if world_size() > 1:
        dist.barrier()


def _collective_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def launch(train, processes, **kwargs):
    """Run `train(**kwargs)` here, or in `processes` workers under torchrun when > 1.

    The workers' output goes to this process's stdout/stderr (the rule's log). A worker
    that fails makes torchrun stop the others; the launch then fails with their status
    (1 for a preempted run whose state was saved: the rerun resumes).
    """
    if processes <= 1:
        return train(**kwargs)
    with tempfile.NamedTemporaryFile(suffix=".pkl", delete=False) as spec:
        pickle.dump({"module": train.__module__, "function": train.__name__, "kwargs": kwargs}, spec)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        "captionflow.training.distributed",
        spec.name,
    ]
    print(f"{train.__module__}: {processes} processes under torchrun", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        # Its own session: a signal to this process reaches torchrun once, through us.
        proc = subprocess.Popen(command, stdout=sys.stdout, stderr=sys.stderr, start_new_session=True)

        def forward(signum, frame):  # preemption: torchrun passes SIGTERM on to the workers
            print(f"{signal.Signals(signum).name} received: SIGTERM to torchrun", flush=True)
            proc.send_signal(signal.SIGTERM)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            status = proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        os.unlink(spec.name)
    if status != 0:
        # the workers printed the reason (or "preempted ... rerun to resume") above
        raise SystemExit(status if status > 0 else 1)


def _worker(spec_path):
    """Entry point of one torchrun worker: join the process group, run the stage."""
    import importlib

    from captionflow.errors import one_line_errors

    with open(spec_path, "rb") as f:
        spec = pickle.load(f)
    train = getattr(importlib.import_module(spec["module"]), spec["function"])
    backend = "nccl" if torch.cuda.is_available() and spec["kwargs"]["cfg"].device != "cpu" else "gloo"
    dist.init_process_group(backend)
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "none visible")
    print(f"worker rank {dist.get_rank()} of {dist.get_world_size()} ({backend}; GPUs: {gpus})", flush=True)
    try:
        with one_line_errors():
            train(**spec["kwargs"])
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise CaptionflowError("usage: torchrun ... -m captionflow.training.distributed SPEC.pkl")
    _worker(sys.argv[1])
