"""The learning-rate schedule every training regime uses (its `schedule` settings).

Linear warmup over `warmup_steps` optimizer steps, then one of: cosine decay per step,
reduce-on-plateau of the validation score per epoch, `step` decay (x decay_factor every
decay_every epochs, counted from decay_start_epoch: AoANet / ruotianluo's
learning_rate_decay_start/every/rate, ExpansionNet v2's "annealing") or `multistep` decay
(x decay_factor at each epoch of `milestones`). step and multistep set the learning rate of
an epoch when it starts (from the number of epochs done), and multiply the warmup factor:
lr = base x warmup(step) x decay(epoch), so warmup and decay compose as in ExpansionNet v2
and, once warmup is over, as in AoANet.
"""

import math
from dataclasses import dataclass, fields

from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from captionflow.errors import CaptionflowError

SCHEDULES = ("cosine", "plateau", "step", "multistep")


@dataclass(frozen=True)
class ScheduleConfig:
    """The schedule's settings, the fields of the same name in a stage's config section."""

    warmup_steps: int
    schedule: str  # cosine | plateau | step | multistep
    min_lr_ratio: float  # cosine: final lr = lr * min_lr_ratio
    plateau_factor: float
    plateau_patience: int
    decay_factor: float  # step, multistep: lr factor of each decay
    decay_every: int  # step: epochs between decays
    decay_start_epoch: int  # step: decays count from this epoch (AoANet's learning_rate_decay_start)
    milestones: list  # multistep: epochs (0-based) from whose start on the lr is decay_factor x lower

    @classmethod
    def of(cls, cfg, section):
        """The schedule settings of stage config `cfg` (section: its config name, for errors)."""
        if cfg.schedule not in SCHEDULES:
            raise CaptionflowError(f"{section}.schedule {cfg.schedule!r} is not one of {', '.join(SCHEDULES)}")
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


def epoch_decay(cfg, epoch):
    """The factor of step / multistep decay in epoch `epoch` (0-based; 1 for other schedules).

    step: decay_factor ** floor((epoch - decay_start_epoch) / decay_every), 1 before
    decay_start_epoch; multistep: decay_factor ** (milestones <= epoch)."""
    if cfg.schedule == "step":
        return cfg.decay_factor ** max(0, (epoch - cfg.decay_start_epoch) // cfg.decay_every)
    if cfg.schedule == "multistep":
        return cfg.decay_factor ** sum(1 for m in cfg.milestones if m <= epoch)
    return 1.0


class LRSchedule:
    """Linear warmup, then cosine decay (per step), reduce-on-plateau (per epoch), or step /
    multistep decay (per epoch, multiplying the warmup factor).

    Every parameter group follows the schedule from its own learning rate (end-to-end
    training gives the backbone a smaller one than the captioner).
    """

    def __init__(self, optimizer, cfg, total_steps):
        # cfg: ScheduleConfig
        self.optimizer, self.cfg = optimizer, cfg
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.epoch, self.step = 0, 0  # step / multistep: epochs and optimizer steps done
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
        self.by_epoch = cfg.schedule in ("step", "multistep")
        if self.by_epoch:
            self._set_decayed()

    def _set_warmup(self, step):
        warmup = max(1, self.cfg.warmup_steps)
        if step < warmup:
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * (step + 1) / warmup

    def _set_decayed(self):
        """step / multistep: lr = base x warmup factor of the steps done x the epoch's decay."""
        warmup = max(1, self.cfg.warmup_steps)
        factor = min(1.0, (self.step + 1) / warmup) * epoch_decay(self.cfg, self.epoch)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def after_step(self, step):
        # step: optimizer steps done
        if self.cosine:
            self.cosine.step()
        elif self.by_epoch:
            self.step = step
            if step < max(1, self.cfg.warmup_steps):
                self._set_decayed()
        else:
            self._set_warmup(step)

    def after_epoch(self, score):
        if self.plateau:
            self.plateau.step(score)
        if self.by_epoch:  # the next epoch's learning rate, set at its start
            self.epoch += 1
            self._set_decayed()

    def state_dict(self):
        return {
            "cosine": self.cosine.state_dict() if self.cosine else None,
            "plateau": self.plateau.state_dict() if self.plateau else None,
            "epoch": self.epoch,
            "step": self.step,
        }

    def load_state_dict(self, state):
        if self.cosine:
            self.cosine.load_state_dict(state["cosine"])
        if self.plateau:
            self.plateau.load_state_dict(state["plateau"])
        if self.by_epoch:
            self.epoch, self.step = state["epoch"], state["step"]
            self._set_decayed()
