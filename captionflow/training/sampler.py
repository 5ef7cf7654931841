"""Length-bucketed batches: captions of similar length share a batch (less padding).

Each epoch's batch list is a pure function of (seed, epoch), so a resumed run rebuilds it
and skips the batches it had already done: the sampler position is one integer.
"""

import torch


def bucketed_batches(lengths, batch_size, seed, epoch, bucket_factor=20):
    """-> list of index lists covering every caption once.

    Shuffle, cut into pools of batch_size * bucket_factor, sort each pool by length,
    cut pools into batches, shuffle the batch order.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    pool = batch_size * bucket_factor
    batches = []
    for p in range(0, len(perm), pool):
        chunk = sorted(perm[p : p + pool], key=lambda i: lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


def image_batches(n, batch_size, seed, epoch):
    """Images 0..n-1 shuffled per epoch and cut into batches (SCST batches are images)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[b : b + batch_size] for b in range(0, n, batch_size)]
