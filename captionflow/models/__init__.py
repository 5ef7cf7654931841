"""Captioning models: a registry (names are config values) and one decoding protocol.

Every model maps features to next-word log-probabilities through
    init_state(feats) -> state            feats: {"att": (B, R, D), "fc": (B, D)}
    step(tokens, state) -> (logprobs, state)   tokens (B,) -> logprobs (B, V + 1)
where `state` is a dict of tensors whose first dimension is the batch, so decoding code
can expand it to beams and reorder it with index_select (a transformer's key/value cache
fits the same shape). Token 0 is both the start and the end of a caption.
"""

from captionflow.models.registry import CAPTIONERS, MODELS, create_model, register_model

# Importing the modules registers their models.
from captionflow.models import aoanet, expansionnet, fc, show_attend_tell, transformer  # noqa: E402,F401  isort: skip

__all__ = ["CAPTIONERS", "MODELS", "create_model", "register_model"]
