"""The learning-rate schedule every training regime uses (its `schedule` settings)."""

import math

from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau


class LRSchedule:
    """Linear warmup, then cosine decay (per step) or reduce-on-plateau (per epoch)."""

    def __init__(self, optimizer, cfg, total_steps):
        self.optimizer, self.cfg = optimizer, cfg
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
            for group in self.optimizer.param_groups:
                group["lr"] = self.cfg.lr * (step + 1) / warmup

    def after_step(self, step):
        if self.cosine:
            self.cosine.step()
        else:
            self._set_warmup(step)

    def after_epoch(self, score):
        if self.plateau:
            self.plateau.step(score)

    def state_dict(self):
        return {"cosine": self.cosine.state_dict() if self.cosine else None, "plateau": self.plateau.state_dict() if self.plateau else None}

    def load_state_dict(self, state):
        if self.cosine:
            self.cosine.load_state_dict(state["cosine"])
        if self.plateau:
            self.plateau.load_state_dict(state["plateau"])
