"""How many threads a stage's torch work uses."""

import os

import torch


def use_threads(threads):
    """Set torch's intra-op threads to `threads`, but no more than the CPUs this process
    may run on (its affinity mask: what SLURM's cgroup or `taskset` grants). More threads
    than CPUs only make OpenMP's threads wait for each other. Returns the number set."""
    n = max(1, min(int(threads), len(os.sched_getaffinity(0))))
    torch.set_num_threads(n)
    return n
