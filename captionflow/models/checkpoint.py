"""Checkpoints: save atomically, load safely (weights_only), refuse mismatches in one line."""

import torch

from captionflow.errors import CaptionflowError
from captionflow.models import create_model
from captionflow.utils.io import atomic_path
from captionflow.utils.state import first_nonfinite, load_checked, load_torch_file

# What every model checkpoint a training stage writes holds (TrainingRun's `meta` + model).
CHECKPOINT_KEYS = ("model", "model_name", "model_args", "vocab_hash")


def save(obj, path):
    """torch.save through a temporary file and a rename: never a half-written checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load(path):
    """torch.load with weights_only=True (no arbitrary pickles), one-line error if unreadable
    or if the file carries Python objects (e.g. code) instead of tensors."""
    return load_torch_file(
        path, "checkpoint", "a captionflow checkpoint", "delete it and rerun the stage that writes it"
    )


def _model_checkpoint(path):
    """A model checkpoint a training stage wrote, checked: its keys and finite weights."""
    ckpt = load(path)
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CaptionflowError(
            f"checkpoint {path} is not a captionflow checkpoint (no {', '.join(missing)}: e.g. a bare state dict "
            "or backbone weights); give the model.pt a training stage wrote"
        )
    bad = first_nonfinite(ckpt["model"]) if isinstance(ckpt["model"], dict) else None
    if bad is not None:
        raise CaptionflowError(
            f"checkpoint {path} holds NaN or inf weights ({bad}): a diverged run wrote it; retrain it"
        )
    return ckpt


def load_model(path, vocab_hash=None):
    """Rebuild the model a checkpoint was trained as -> (model in eval mode, checkpoint dict).

    vocab_hash: the labels' vocabulary hash; a checkpoint of another vocabulary is refused.
    """
    ckpt = _model_checkpoint(path)
    if vocab_hash is not None and ckpt["vocab_hash"] != vocab_hash:
        raise CaptionflowError(
            f"checkpoint {path} was trained with vocabulary {ckpt['vocab_hash']}, these labels have {vocab_hash}; "
            "rerun training after prepro_labels"
        )
    model = create_model(ckpt["model_name"], **ckpt["model_args"])
    load_checked(model, ckpt["model"], path, f"model {ckpt['model_name']} {ckpt['model_args']}")
    return model.eval(), ckpt


def check_feature_dim(ckpt, path, feat_dim, source, fix):
    """Refuse, in one line, features of another size D than the checkpoint's model reads.

    source: where the features come from (a file, a backbone); fix: what to do instead.
    """
    trained = ckpt["model_args"].get("feat_dim")
    if trained is not None and int(trained) != int(feat_dim):
        raise CaptionflowError(
            f"{source} has {feat_dim}-d features, but checkpoint {path} was trained on {trained}-d features; {fix}"
        )
