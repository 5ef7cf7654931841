"""CaptionModel: the decoding protocol plus teacher-forced training shared by all models."""

import torch
from torch import nn

from captionflow.errors import CaptionflowError


def check_sizes(model_name, d_model, n_heads, **layers):
    """Refuse sizes no layer can be built with, naming the option (a one-line user error)."""
    if d_model < 1 or n_heads < 1 or d_model % n_heads:
        raise CaptionflowError(f"model {model_name}: n_heads ({n_heads}) must divide embed_size ({d_model})")
    for name, n in layers.items():
        if n < 1:
            raise CaptionflowError(f"model {model_name}: {name} must be at least 1, got {n}")


def check_choice(model_name, option, value, choices):
    """Refuse a value of `option` outside `choices` (the model's option_choices entry), in one line."""
    if value not in choices:
        raise CaptionflowError(f"model {model_name}: {option} must be one of {', '.join(choices)}, got {value!r}")


class FeatureNorm(nn.Module):
    """Standardise features per dimension with training-set statistics (buffers).

    Backbone features share a large common component (random-init grids have a mean cosine
    similarity near 0.98 between images); removing it lets the captioner see what differs.
    The statistics travel in the checkpoint, so evaluation normalises identically.
    """

    def __init__(self, dim):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x, mask=None):
        # x (N, ..., D): statistics over every leading dimension; mask (N, ...) bool: real rows
        flat = (x[mask] if mask is not None else x).reshape(-1, x.shape[-1]).float()
        self.mean.copy_(flat.mean(dim=0))
        self.std.copy_(flat.std(dim=0).clamp_min(1e-3))

    def forward(self, x):
        return (x - self.mean) / self.std


class CaptionModel(nn.Module):
    """Base class. Subclasses implement `init_state` and `step` (see captionflow.models).

    vocab_size counts words only; outputs have vocab_size + 1 entries, index 0 = end.
    """

    registry_name = None
    # State entries computed once per image in init_state and never changed by step (the
    # regions, their projections, masks): beam search does not reorder them, as every
    # beam of an image holds the same rows.
    image_state = ()
    # {option: allowed values} of the constructor's options that take one of a few names; the
    # registry refuses any other value at config check (Registry.bad_values).
    option_choices = {}

    def fit_feature_norms(self, feats):
        """Set every FeatureNorm from a sample of training features {"att", "fc"[, "att_mask"]}."""
        for name, module in self.named_children():
            if isinstance(module, FeatureNorm):
                key = name.removesuffix("_norm")
                module.fit(feats[key], feats.get("att_mask") if key == "att" else None)

    def init_state(self, feats):
        raise NotImplementedError

    def step(self, tokens, state):
        raise NotImplementedError

    def attention_layer(self):
        """The layer whose weights over the image regions show where the model looks while
        it writes each word (AdditiveAttention or MultiHeadAttention), or None: a model
        without attention over regions. Read by captionflow.report.attention."""
        return None

    def aux_loss(self, aux, mask):
        """Extra training loss from per-step outputs (e.g. attention regularisation)."""
        return torch.zeros((), device=mask.device)

    def forward(self, feats, inputs, ss_prob=0.0, generator=None):
        """= teacher_forcing: the call DistributedDataParallel wraps during XE training."""
        return self.teacher_forcing(feats, inputs, ss_prob, generator)

    def teacher_forcing(self, feats, inputs, ss_prob=0.0, generator=None):
        """Next-word log-probs with ground-truth inputs, optionally scheduled sampling.

        inputs (B, T): token fed at each step (0 = start) -> logprobs (B, T, V + 1), aux
        dict of per-step tensors stacked on dim 1. With probability ss_prob per position
        (Bengio et al. 2015) the model's own sample replaces the ground-truth input.
        """
        state = self.init_state(feats)
        outputs, aux = [], {}
        prev = None
        for t in range(inputs.shape[1]):
            tokens = inputs[:, t]
            if ss_prob > 0 and t > 0:
                use_model = torch.rand(tokens.shape, generator=generator, device=tokens.device) < ss_prob
                if use_model.any():
                    sampled = torch.multinomial(prev.detach().exp(), 1, generator=generator).squeeze(1)
                    tokens = torch.where(use_model, sampled, tokens)
            prev, state = self.step(tokens, state)
            outputs.append(prev)
            for k, v in state.items():
                if k.startswith("aux_"):
                    aux.setdefault(k, []).append(v)
        return torch.stack(outputs, dim=1), {k: torch.stack(v, dim=1) for k, v in aux.items()}
