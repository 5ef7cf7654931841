"""Torch files read safely, and state dicts loaded only when every key and shape fits.

`load_torch_file` is the one place a `.pt`/`.pth` file is read: with weights_only=True,
so a pickle that would run code never runs, and torch's refusals (whose first advice is to
disable weights_only, the one thing a user must not do with an unknown file) become one
line that says what the file is.
"""

import pickle
import re

import torch

from captionflow.errors import CaptionflowError


def _few(items):
    return ", ".join(items[:3]) + (" ..." if len(items) > 3 else "")


def _torch_reason(exc):
    """The informative part of torch.load's error, without its advice to disable weights_only."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln and "torch.load" not in ln
    ]
    first = lines[0].split(". ")[0].rstrip(".") if lines else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def load_torch_file(path, what="checkpoint", expected="a captionflow checkpoint", fix="rerun the stage that writes it"):
    """torch.load(path) with weights_only=True (tensors, dicts, lists and numbers only).

    Raises a one-line CaptionflowError, `what` and `path` first, for a missing file, for a
    file holding Python objects that weights_only loading refuses (code, classes: nothing
    of it runs) and for an empty, truncated or foreign file ("cannot be read"); `fix` says
    what to do (None: nothing is added).
    """
    fix = f"; {fix}" if fix else ""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CaptionflowError(f"{what} {path} does not exist{fix}") from None
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:  # a pickle that names Python callables or classes: it would run code
            raise CaptionflowError(
                f"{what} {path} is not {expected}: it holds Python objects ({found.group(1)}) that safe "
                "(weights_only) loading refuses, e.g. code that would run on loading, and nothing of it was "
                f"run; do not load it with weights_only=False unless you trust its source{fix}"
            ) from None
        raise CaptionflowError(
            f"{what} {path} cannot be read: it is not {expected} (not a torch file: {_torch_reason(exc)}){fix}"
        ) from None
    except Exception as exc:  # truncated zip (RuntimeError), empty file (EOFError), text ...
        raise CaptionflowError(
            f"{what} {path} cannot be read: it is empty, truncated or not a torch file ({_torch_reason(exc)}){fix}"
        ) from None


def first_nonfinite(state):
    """The first key of a state dict whose floating-point tensor holds NaN or inf, or None."""
    for key, value in state.items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return key
    return None


def load_checked(module, state, source, what):
    """Load `state` into `module`; on any key or shape difference raise a one-line error.

    source: where the state came from (a path); what: the model's name for the message.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (file vs model: {_few(wrong)})")
        if missing:
            parts.append(f"{len(missing)} missing keys ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_few(unexpected)})")
        raise CaptionflowError(f"weights {source} do not fit {what}: {'; '.join(parts)}")
    module.load_state_dict(state)
