"""The learning-rate schedule every training regime uses (its `schedule` settings)."""

import math
from dataclasses import dataclass, fields

from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from captionflow.errors import CaptionflowError

SCHEDULES = ("cosine", "plateau")


@dataclass(frozen=True)
class ScheduleConfig:
    """The schedule's settings, the fields of the same name in a stage's config section."""

    warmup_steps: int
    schedule: str  # cosine | plateau
    min_lr_ratio: float  # cosine: final lr = lr * min_lr_ratio
    plateau_factor: float
    plateau_patience: int

    @classmethod
    def of(cls, cfg, section):
        """The schedule settings of stage config `cfg` (section: its config name, for errors)."""
        if cfg.schedule not in SCHEDULES:
            raise CaptionflowError(f"{section}.schedule {cfg.schedule!r} is not one of {', '.join(SCHEDULES)}")
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


class LRSchedule:
    """Linear warmup, then cosine decay (per step) or reduce-on-plateau (per epoch).

    Every parameter group follows the schedule from its own learning rate (end-to-end
    training gives the backbone a smaller one than the captioner).
    """

    def __init__(self, optimizer, cfg, total_steps):
        # cfg: ScheduleConfig
        self.optimizer, self.cfg = optimizer, cfg
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        warmup = max(1, cfg.warmup_steps)

        def warmup_cosine(step):
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        self.cosine = LambdaLR(optimizer, lr_lambda=warmup_cosine) if cfg.schedule == "cosine" else None
        self.plateau = None
        if cfg.schedule == "plateau":
            # keyword arguments only: the positional order differs between torch versions
            self.plateau = ReduceLROnPlateau(
                optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience
            )
            self._set_warmup(0)

    def _set_warmup(self, step):
        warmup = max(1, self.cfg.warmup_steps)
        if step < warmup:
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * (step + 1) / warmup

    def after_step(self, step):
        if self.cosine:
            self.cosine.step()
        else:
            self._set_warmup(step)

    def after_epoch(self, score):
        if self.plateau:
            self.plateau.step(score)

    def state_dict(self):
        return {
            "cosine": self.cosine.state_dict() if self.cosine else None,
            "plateau": self.plateau.state_dict() if self.plateau else None,
        }

    def load_state_dict(self, state):
        if self.cosine:
            self.cosine.load_state_dict(state["cosine"])
        if self.plateau:
            self.plateau.load_state_dict(state["plateau"])
