"""Stages never run more torch threads than the CPUs they may use."""

import os

import torch

from captionflow.utils.threads import use_threads


def test_threads_are_capped_at_the_cpus_of_the_affinity_mask():
    cpus, before = os.sched_getaffinity(0), torch.get_num_threads()
    try:
        os.sched_setaffinity(0, {min(cpus)})  # what `taskset -c N` or a 1-CPU SLURM job grants
        assert use_threads(4) == 1 and torch.get_num_threads() == 1
        os.sched_setaffinity(0, cpus)
        assert use_threads(1) == 1
        assert use_threads(64) == len(cpus) == torch.get_num_threads()
        assert use_threads(0) == 1
    finally:
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(before)
