"""What the regimes' training recipes share (xe, scst, e2e, scst_e2e): their settings
(optimizer, schedule, clipping, accumulation, dropout, compile), gradient clipping by norm or
by value, the batches of one optimizer step (gradient accumulation), a stage's dropout
override, and torch.compile of the training forward."""

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from captionflow.errors import CaptionflowError
from captionflow.layers.attention import MultiHeadAttention

CLIP_MODES = ("norm", "value")


@dataclass(frozen=True)
class RecipeSettings:
    """The recipe keys every gradient regime's section has (xe, e2e, scst): its settings
    dataclass inherits them (no defaults: captionflow.config.build fills them from the schema)."""

    lr: float  # e2e: the captioner's (its backbone has backbone_lr)
    weight_decay: float
    warmup_steps: int
    schedule: str  # cosine | plateau | step | multistep (captionflow.training.schedule)
    min_lr_ratio: float  # cosine: final lr = lr * min_lr_ratio (1.0: constant)
    plateau_factor: float
    plateau_patience: int
    grad_clip: float  # threshold of grad_clip_mode
    optimizer: str  # adamw | adam | radam | sgd (captionflow.utils.precision.make_optimizer)
    betas: list  # adam family: [beta1, beta2]
    eps: float  # adam family
    momentum: float  # sgd
    decay_factor: float  # step / multistep: lr factor per decay
    decay_every: int  # step: epochs between decays
    decay_start_epoch: int  # step: epoch the decays count from
    milestones: list  # multistep: epochs at whose start the lr decays
    grad_clip_mode: str  # norm | value (clip_gradients)
    dropout: float | None  # every dropout layer's probability in this stage; None: the model's own
    accumulate: int  # batches per optimizer step
    compile: bool  # torch.compile the training forward (maybe_compile)


def clip_gradients(parameters, grad_clip, mode, where):
    """Clip the gradients of `parameters` in place -> their total L2 norm before clipping
    (a float tensor, for the finiteness check; inf or NaN when a gradient is).

    norm: rescale so that the total norm is at most grad_clip (torch's clip_grad_norm_);
    value: clamp every element to [-grad_clip, grad_clip] (ruotianluo / AoANet's clip_gradient)."""
    if mode not in CLIP_MODES:
        raise CaptionflowError(f"{where}.grad_clip_mode {mode!r} is not one of {', '.join(CLIP_MODES)}")
    parameters = [p for p in parameters if p.grad is not None]
    if mode == "norm":
        return torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    torch.nn.utils.clip_grad_value_(parameters, grad_clip)
    return norm


def step_groups(batches, accumulate):
    """An epoch's batches in groups of `accumulate`, one optimizer step each (the last group
    may be shorter). Resume positions count groups, so a resumed run restarts at a step."""
    return [batches[i : i + accumulate] for i in range(0, len(batches), accumulate)]


def no_sync_unless_last(net, last):
    """DDP's no_sync() for the micro-batches of an accumulated step before its last one (the
    gradients are averaged over the ranks once, at the last backward); nothing otherwise."""
    if last or not hasattr(net, "no_sync"):
        return contextlib.nullcontext()
    return net.no_sync()


def set_dropout(model, p):
    """Set the dropout probability of every dropout layer of `model` to p (None: leave the
    model's own): each torch.nn.Dropout* and the attention dropout of MultiHeadAttention
    (a stored probability given to scaled_dot_product_attention). A layer the model builds
    with p = 0 (AoANet's decoder AoA: the authors' code has no dropout there) stays off: the
    stage's rate replaces the model's rates, it adds no dropout the architecture lacks. The
    probability is not part of the weights, so checkpoints and their model_args stay as they are."""
    if p is None:
        return
    if not (isinstance(p, (int, float)) and math.isfinite(p) and 0 <= p < 1):
        raise CaptionflowError(f"dropout {p!r} is not a probability in [0, 1)")
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            module.p = float(p)
        elif isinstance(module, MultiHeadAttention) and module.dropout > 0:
            module.dropout = float(p)


def maybe_compile(module, enabled):
    """torch.compile(module) (inductor) when enabled, else module itself.

    The compiled wrapper shares the module's parameters; only the training forward calls it.
    Checkpoints, states, validation and decoding keep using the plain module, whose
    state_dict has no `_orig_mod.` prefix, so a checkpoint written with compile loads
    without it. Under DDP, pass the DDP wrapper (torch compiles DistributedDataParallel
    itself, splitting the graph at its gradient buckets: torch._dynamo.config.optimize_ddp)."""
    return torch.compile(module) if enabled else module


class CompiledDecoding:
    """`model`'s decoding protocol (init_state, step) through torch.compile: SCST's training
    forward is sampling, a loop of step() calls that never goes through forward()."""

    def __init__(self, model):
        self.init_state = torch.compile(model.init_state)
        self.step = torch.compile(model.step)


def maybe_compile_decoding(model, enabled):
    """CompiledDecoding(model) when enabled, else model itself (what sampling is given)."""
    return CompiledDecoding(model) if enabled else model
