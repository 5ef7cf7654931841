"""Perturbations of a model's weights for evolution strategies: noise regenerated from seeds,
flat parameter vectors, and safe mutations (Lehman et al. 2018, "Safe Mutations for Deep
and Recurrent Neural Networks through Output Gradients").

Shared seeds (Salimans et al. 2017): perturbation i of iteration t is N(0, I) drawn from a
generator seeded by (seed, t, i), so any process regenerates it from three integers and
what workers exchange per generation is fitnesses, never parameter vectors.

Safe mutations scale each weight's perturbation by 1 / sensitivity, the sensitivity of the
model's outputs to that weight on a reference batch. The outputs are the next-word
log-probabilities y_k (k over the vocabulary) summed over the batch's captions and steps:
    SM-G-SUM         s_w = sqrt(sum_k (d y_k / d w)^2), the gradient summed over the batch
                     before squaring; the perturbation is eps_w / max(s_w, underflow)
    SM-PROPORTIONAL  the same 1 / max(s_w, underflow), rescaled to mean 1 over the weights:
                     perturbations shift towards insensitive weights, the overall step size
                     stays that of plain noise
    none             1 for every weight
`underflow` caps how small a sensitivity counts (a weight the outputs ignore would get an
unbounded perturbation otherwise).
"""

import hashlib

import torch

SAFE_MUTATIONS = ("none", "SM-G-SUM", "SM-PROPORTIONAL")


def _seed(*parts):
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def perturbation(seed, iteration, index, n):
    """N(0, I) of size n, the same in every process for (seed, iteration, index)."""
    return torch.randn(n, generator=torch.Generator().manual_seed(_seed(seed, iteration, index)))


def generator_for(seed, iteration, purpose):
    """A torch generator for one iteration's other random choices (batches, selection)."""
    return torch.Generator().manual_seed(_seed(seed, iteration, purpose))


def flat_params(model):
    """The model's parameters as one float32 CPU vector (a copy)."""
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])


def set_flat_params(model, vector):
    """Copy a flat vector (flat_params' layout) into the model's parameters."""
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(vector[offset : offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()


def output_sensitivity(model, outputs_fn):
    """s_w = sqrt(sum_k (d y_k / d w)^2) for y = outputs_fn() (K,), summed over a batch."""
    params = [p for p in model.parameters()]
    y = outputs_fn()
    total = torch.zeros(sum(p.numel() for p in params))
    for k in range(y.numel()):
        grads = torch.autograd.grad(y[k], params, retain_graph=k + 1 < y.numel(), allow_unused=True)
        flat = torch.cat(
            [(g if g is not None else torch.zeros_like(p)).reshape(-1).float().cpu() for g, p in zip(grads, params)]
        )
        total += flat.square()
    return total.sqrt()


def mutation_scale(model, outputs_fn, kind, underflow):
    """The per-weight factor (n,) that perturbations are multiplied by (see the module doc)."""
    n = sum(p.numel() for p in model.parameters())
    if kind == "none":
        return torch.ones(n)
    scale = 1.0 / output_sensitivity(model, outputs_fn).clamp_min(underflow)
    if kind == "SM-PROPORTIONAL":
        scale = scale / scale.mean()
    return scale


def caption_outputs(model, feats, inputs, mask):
    """The outputs y (V + 1,) safe mutations measure for a captioner: teacher-forced
    next-word log-probabilities summed over a reference batch's real positions."""

    def outputs():
        logprobs, _ = model.teacher_forcing(feats, inputs)
        return (logprobs * mask[..., None]).sum(dim=(0, 1))

    return outputs
