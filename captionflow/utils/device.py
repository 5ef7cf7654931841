"""The torch device a stage runs on, from its `device` setting (auto | cpu | cuda)."""

import torch

from captionflow.errors import CaptionflowError


def resolve_device(device):
    """auto: CUDA when visible, else the CPU; cuda without a visible GPU is refused."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CaptionflowError("device is 'cuda' but no CUDA device is visible: set the stage's device to auto or cpu")
    return torch.device(device)
