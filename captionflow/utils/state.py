"""Loading a state dict only when every key and shape fits, else one line saying what differs."""

from captionflow.errors import CaptionflowError


def _few(items):
    return ", ".join(items[:3]) + (" ..." if len(items) > 3 else "")


def load_checked(module, state, source, what):
    """Load `state` into `module`; on any key or shape difference raise a one-line error.

    source: where the state came from (a path); what: the model's name for the message.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
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
