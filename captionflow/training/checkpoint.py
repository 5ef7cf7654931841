"""Checkpoints: save atomically, load safely (weights_only), refuse mismatches in one line."""

import torch

from captionflow.errors import CaptionflowError
from captionflow.models import create_model
from captionflow.utils.io import atomic_path
from captionflow.utils.state import load_checked


def save(obj, path):
    """torch.save through a temporary file and a rename: never a half-written checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load(path):
    """torch.load with weights_only=True (no arbitrary pickles), one-line error if unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CaptionflowError(f"checkpoint {path} does not exist") from None
    except Exception as exc:
        raise CaptionflowError(f"checkpoint {path} cannot be read: {type(exc).__name__}: {exc}") from None


def load_model(path, vocab_hash=None):
    """Rebuild the model a checkpoint was trained as -> (model in eval mode, checkpoint dict).

    vocab_hash: the labels' vocabulary hash; a checkpoint of another vocabulary is refused.
    """
    ckpt = load(path)
    if vocab_hash is not None and ckpt["vocab_hash"] != vocab_hash:
        raise CaptionflowError(
            f"checkpoint {path} was trained with vocabulary {ckpt['vocab_hash']}, these labels have {vocab_hash}; "
            "rerun training after prepro_labels"
        )
    model = create_model(ckpt["model_name"], **ckpt["model_args"])
    load_checked(model, ckpt["model"], path, f"model {ckpt['model_name']} {ckpt['model_args']}")
    return model.eval(), ckpt


def load_weights(model, path, vocab_hash):
    """Load a checkpoint's weights into an existing `model` (e.g. SCST starting from XE).

    Refuses, in one line, a checkpoint of another vocabulary or architecture/size.
    """
    ckpt = load(path)
    if ckpt["vocab_hash"] != vocab_hash:
        raise CaptionflowError(
            f"checkpoint {path} was trained with vocabulary {ckpt['vocab_hash']}, these labels have {vocab_hash}"
        )
    load_checked(model, ckpt["model"], path, f"model {model.registry_name}")
    return ckpt
