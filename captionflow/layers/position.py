"""Sinusoidal position encodings (Vaswani et al. 2017, sec. 3.5)."""

import math

import torch


def sinusoids(positions, dim):
    """positions (T,) -> (T, dim): PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(...).

    Computed on the fly, so captions of any length have positions.
    """
    half = (dim + 1) // 2
    freqs = torch.exp(torch.arange(half, device=positions.device) * (-2.0 * math.log(10000.0) / dim))
    angles = positions.float()[:, None] * freqs[None]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)[:, :dim]
