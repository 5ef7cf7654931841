"""Perturbations of a model's weights for evolution strategies: noise regenerated from seeds,
flat parameter vectors, and safe mutations (Lehman et al. 2018, "Safe Mutations for Deep
and Recurrent Neural Networks through Output Gradients"), as NIC-ES / NIC-NES use them.

Shared seeds (Salimans et al. 2017): perturbation i of iteration t is N(0, I) drawn from a
generator seeded by (seed, t, i), so any process regenerates it from three integers and
what workers exchange per generation is fitnesses, never parameter vectors.

A safe mutation multiplies each weight's noise by a factor f_w (the perturbation is
sigma * f_w * eps_w); u is `safe_mutation_underflow`:
    SM-G-SUM         s_w = sqrt(sum_k (d Y_k / d w)^2) / B, Y_k the k-th output summed over
                     a reference batch of B images (the gradient is summed over the batch
                     before squaring); f_w = 1 / (max(s_w, u) / u) = u / max(s_w, u): weights
                     less sensitive than u keep the plain noise, the others get less. The
                     outputs (greedy_step_outputs): the L2 norms of groups of 100 words'
                     log-probabilities at the 5th greedy step
    SM-VECTOR        the same with s_w read from a file (`safe_mutation_vector`, computed
                     once, e.g. on another run): f_w = min_v max(s_v, u) / max(s_w, u)
    SM-PROPORTIONAL  no gradients: f_w = |theta_w| of the weights being mutated, a zero
                     weight taking the mean |theta| (noise proportional to each weight)
    none             f_w = 1
"""

import hashlib

import torch

from captionflow.errors import CaptionflowError

SAFE_MUTATIONS = ("none", "SM-G-SUM", "SM-VECTOR", "SM-PROPORTIONAL")
SENSITIVITY_STEPS = 5  # greedy words before the outputs SM-G-SUM differentiates (the source's)
SENSITIVITY_GROUP = 100  # words per output group (the source's)


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


def output_sensitivity(model, outputs_fn, batch_size):
    """s_w = sqrt(sum_k (d y_k / d w)^2) / batch_size for y = outputs_fn() (K,), each y_k
    summed over a batch of batch_size examples."""
    params = [p for p in model.parameters()]
    y = outputs_fn()
    total = torch.zeros(sum(p.numel() for p in params))
    for k in range(y.numel()):
        grads = torch.autograd.grad(y[k], params, retain_graph=k + 1 < y.numel(), allow_unused=True)
        flat = torch.cat(
            [(g if g is not None else torch.zeros_like(p)).reshape(-1).float().cpu() for g, p in zip(grads, params)]
        )
        total += flat.square()
    return total.sqrt() / batch_size


def sensitivity_scale(sensitivity, kind, underflow):
    """f (n,) of SM-G-SUM (sensitivities divided by the underflow) or SM-VECTOR (divided by
    their smallest value), sensitivities below `underflow` counting as `underflow`."""
    clamped = sensitivity.float().clamp_min(underflow)
    return (clamped.min() if kind == "SM-VECTOR" else underflow) / clamped


def proportional_scale(params):
    """f (n,) of SM-PROPORTIONAL: |theta|, a zero weight taking the mean |theta|."""
    magnitude = params.abs()
    return torch.where(magnitude == 0, magnitude.mean(), magnitude)


def load_sensitivity_vector(path, n):
    """The sensitivities (n,) of SM-VECTOR from a torch file holding one tensor of n numbers."""
    try:
        vector = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise CaptionflowError(
            f"es.safe_mutation_vector {path}: cannot read it ({exc}); give a torch.save'd tensor"
        ) from None
    if not isinstance(vector, torch.Tensor) or vector.numel() != n:
        raise CaptionflowError(
            f"es.safe_mutation_vector {path} must hold one tensor of {n} sensitivities (one per model weight)"
        )
    return vector.reshape(-1).float()


def greedy_step_outputs(model, feats, steps=SENSITIVITY_STEPS, group=SENSITIVITY_GROUP):
    """The outputs y (K,) SM-G-SUM measures for a captioner, as the source does: greedy
    decoding for `steps` words from the start token (not stopping at the end token); the
    last step's log-probabilities (B, V + 1) cut into groups of `group` words (the last one
    shorter where V + 1 is not a multiple), each group's L2 norm; summed over the B images."""

    def outputs():
        state = model.init_state(feats)
        first = next(iter(feats.values()))
        tokens = torch.zeros(first.shape[0], dtype=torch.long, device=first.device)
        for _ in range(steps):
            logprobs, state = model.step(tokens, state)
            tokens = logprobs.detach().argmax(dim=-1)
        logprobs = logprobs.float()
        norms = [chunk.square().sum(dim=1).sqrt() for chunk in logprobs.split(group, dim=1)]
        return torch.stack(norms, dim=1).sum(dim=0)

    return outputs
