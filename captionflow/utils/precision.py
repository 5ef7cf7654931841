"""Mixed precision for XE, SCST, evaluate and extraction: `precision: fp32 | bf16 | fp16`.

bf16 and fp16 run the forward passes under torch.autocast (matrix products and
convolutions in 16 bits, reductions and losses in float32); fp16 also scales the loss
(GradScaler) so that small gradients do not underflow, and an inf gradient then makes the
scaler skip that step and lower its scale instead of stopping the run. fp16 needs CUDA;
bf16 runs on the CPU too (slower there on most CPUs: it is for checking, the demo trains in
float32). fp32, the default, changes nothing.
"""

import contextlib

import torch

from captionflow.errors import CaptionflowError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """A stage's precision on a device: `autocast()` around forward passes, and the
    gradient scaler (`backward`, `step`) around the optimizer step."""

    def __init__(self, name, device, where="precision"):
        if name not in DTYPES:
            raise CaptionflowError(f"{where} {name!r} is not one of {', '.join(DTYPES)}")
        if name == "fp16" and device.type != "cuda":
            raise CaptionflowError(
                f"{where} fp16 needs a CUDA device (this job runs on {device.type}); use bf16 or fp32"
            )
        self.name, self.device, self.dtype = name, device, DTYPES[name]
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype is torch.float16)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss):
        self.scaler.scale(loss).backward()

    def unscale(self, optimizer):
        """Before clipping: the gradients at their true size."""
        self.scaler.unscale_(optimizer)

    def checked_grad_norm(self, grad_norm):
        """The gradient norm for the finiteness check: None under fp16, where an inf
        gradient is the scaler's to skip."""
        return None if self.scaler.is_enabled() else grad_norm

    def step(self, optimizer):
        self.scaler.step(optimizer)  # = optimizer.step() unless fp16
        self.scaler.update()


OPTIMIZERS = ("adamw", "adam", "radam", "sgd")


def adamw(params, device, **kwargs):
    """AdamW, fused into one kernel on CUDA (the CPU keeps the default implementation, whose
    numbers the demo's figures and resume tests were measured with)."""
    return torch.optim.AdamW(params, fused=device.type == "cuda" or None, **kwargs)


def make_optimizer(params, device, cfg, where):
    """The optimizer a training section names (cfg: its settings: optimizer, lr, weight_decay,
    betas, eps, momentum), over `params` (parameters, or parameter groups with their own lr).

    adamw decays the weights apart from the gradient (decoupled); adam, radam and sgd add
    weight_decay x weight to the gradient (torch's L2 term). On CUDA: one fused kernel where
    torch has one (adamw, adam, sgd), else the multi-tensor (foreach) path (radam); the CPU
    keeps torch's default implementation, so the CPU numbers of adamw are today's.
    """
    if cfg.optimizer not in OPTIMIZERS:
        raise CaptionflowError(f"{where}.optimizer {cfg.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    cuda = device.type == "cuda" or None
    common = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    adam_family = {**common, "betas": tuple(cfg.betas), "eps": cfg.eps}
    if cfg.optimizer == "adamw":
        return adamw(params, device, **adam_family)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, fused=cuda, **adam_family)
    if cfg.optimizer == "radam":
        return torch.optim.RAdam(params, foreach=cuda, **adam_family)
    return torch.optim.SGD(params, momentum=cfg.momentum, fused=cuda, **common)
