"""Bookkeeping every training regime shares: exact resume, best checkpoint, history, TensorBoard.

A regime (xe, scst, ...) owns its model, optimizer and step; `TrainingRun` owns everything
around it. Mid-run state lives at `<out dir>/state/last.pt` (undeclared by the rule, so
Snakemake never deletes it): model, optimizer, schedule, RNG states and `progress` (epoch,
position in the epoch's batch list, step, best score, history). The declared outputs (the
best checkpoint and the history TSV) are written last, atomically, by `finish`, which then
removes `state/`: only an interrupted run leaves state behind, so a forced or changed rerun
of a finished stage starts over instead of returning the old model. A state of other
settings or inputs (its `key` differs) starts over too, and one that cannot be read is set
aside as `last.pt.unreadable` with a one-line notice (also one that holds Python objects,
e.g. code: weights_only loading refuses it and nothing of it runs).

NaN never becomes a checkpoint: every regime calls `check_finite` after the backward pass
and before the optimizer step, and checks the weights after it (`step_done`). At the first
NaN or inf the run stops with one CaptionflowError line (stage, epoch, step, likely
cause); no declared output is written and the state already saved (finite) stays.

When: every `checkpoint_every` optimizer steps (0: never by steps) and every
`checkpoint_minutes` of training (0: never by time), at each epoch's end, and on
preemption. A COCO-sized state (442 MiB for paper-size ExpansionNet v2) takes seconds to
serialise, so periodic states are written off the training thread: the step copies the
state (tensors to CPU) and a writer thread serialises it while training goes on; one write
is in flight at most, and a failed write (e.g. a full disk) stops the run at the next save.
Epoch-end, preemption and final writes wait for it. Saving changes no number, so resume
stays exact whichever saves happened.

Preemption: SLURM sends SIGTERM (or the SIGUSR1 asked for with --signal) before it kills
a job. Both only set a flag here; after the optimizer step in flight the run writes its
state and exits with status 1 within seconds, and the rerun (a retry) resumes.

Under torchrun (captionflow.training.distributed) every rank keeps the same `progress`;
rank 0 alone writes state, checkpoints, history, TensorBoard and progress bars, and the
ranks agree on a preemption signal each step so that they stop at the same step.
"""

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from captionflow.errors import CaptionflowError
from captionflow.models import checkpoint
from captionflow.training import distributed
from captionflow.utils.io import write_text
from captionflow.utils.state import first_nonfinite, load_torch_file

HISTORY_COLUMNS = ["epoch", "step", "train_loss", "val_cider_d", "lr"]


def fingerprint(*parts):
    """Short hash of everything that must match for a saved state to be resumed."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def nonfinite_hint(section, cfg, data):
    """The likely cause of a non-finite loss, from a regime's settings, for the error line.

    section: the config section (xe, scst, e2e); data: what else feeds the loss (features).
    """
    values = asdict(cfg)
    odd = [f"{section}.{k} = {v}" for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
    smoothing = values.get("label_smoothing")
    if smoothing is not None and math.isfinite(smoothing) and not 0 <= smoothing <= 1:
        odd.append(f"{section}.label_smoothing = {smoothing} (not in [0, 1])")
    if odd:
        return f"{', '.join(odd)}: set a finite value in range"
    return f"a learning rate too high for this model ({section}.lr = {cfg.lr:g}: lower it or raise {section}.warmup_steps) or {data}"


class TrainingRun:
    """Resumable epochs of one regime. `meta` goes into every saved model checkpoint."""

    def __init__(
        self,
        out_checkpoint,
        out_history,
        key,
        meta,
        model,
        optimizer,
        schedule,
        generator,
        epochs,
        patience,
        checkpoint_every,
        name,
        export=None,
        hint="its settings",
        history_columns=HISTORY_COLUMNS,
        score_name="val CIDEr-D",
        checkpoint_minutes=0.0,
        scaler=None,
    ):
        # optimizer, schedule: anything with state_dict()/load_state_dict(), or None (the ES
        # regime passes its algorithm as the optimizer and has no schedule)
        self.out_checkpoint, self.out_history = Path(out_checkpoint), Path(out_history)
        self.state_dir = self.out_checkpoint.parent / "state"
        self.last, self.best = self.state_dir / "last.pt", self.state_dir / "best.pt"
        self.key, self.meta, self.name = key, meta, name
        self.model, self.optimizer, self.schedule, self.generator = model, optimizer, schedule, generator
        self.scaler = scaler  # fp16's GradScaler (captionflow.utils.precision): its scale resumes too
        self.epochs, self.patience, self.checkpoint_every = epochs, patience, checkpoint_every
        self.checkpoint_seconds = checkpoint_minutes * 60
        self._saved_at = time.monotonic()
        self._writing, self._write_error = None, None  # the writer thread in flight, its failure
        self._bar = None  # the epoch's progress bar
        # what the best checkpoint holds besides `meta` (e2e adds the backbone)
        self.export = export or (lambda m: {"model": m.state_dict()})
        self.hint = hint  # the likely cause of a non-finite loss (`nonfinite_hint`)
        self.history_columns = history_columns
        self.score_name = score_name  # what the validation score is, for the log lines
        self.preempted = None
        self._handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        self.progress = {
            "epoch": 0,
            "batch": 0,
            "step": 0,
            "best_score": -1.0,
            "best_epoch": -1,
            "bad_epochs": 0,
            "history": [],
            "loss_sum": 0.0,
            "loss_count": 0,
        }
        self.main = distributed.is_main()
        self._resume()
        self.writer = None
        if self.main:
            self.writer = SummaryWriter(
                log_dir=str(self.out_checkpoint.parent / "tensorboard"), purge_step=self.progress["step"] or None
            )
        self.started = time.time()

    def _resume(self):
        state = self._readable_state()
        if state is None or state.get("key") != self.key:
            if state is not None:
                self.log(f"settings or inputs changed since {self.last} was written: starting over")
            self._start_over()
            return
        self.model.load_state_dict(state["model"])
        for part, saved in ((self.optimizer, state["optimizer"]), (self.schedule, state["schedule"])):
            if part is not None:
                part.load_state_dict(saved)
        if self.scaler is not None and self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        self.generator.set_state(state["generator"])
        self.progress = state["progress"]
        p = self.progress
        self.log(f"resuming from {self.last}: epoch {p['epoch']}, batch {p['batch']}, step {p['step']}")

    def _readable_state(self):
        """The interrupted run's state, or None; an unreadable file is set aside."""
        if not self.last.exists():
            return None
        try:
            state = load_torch_file(self.last, "state", "a captionflow training state", None)
            if not isinstance(state, dict) or not isinstance(state.get("progress"), dict):
                raise CaptionflowError(f"state {self.last} is not a captionflow training state (no progress record)")
            bad = first_nonfinite(state["model"]) if isinstance(state.get("model"), dict) else None
            if bad is not None:
                raise CaptionflowError(f"state {self.last} holds NaN or inf weights ({bad})")
            return state
        except CaptionflowError as exc:
            if self.main:
                os.replace(self.last, self.last.with_name(self.last.name + ".unreadable"))
            self.log(f"{exc}; set aside as {self.last.name}.unreadable, starting over")
            return None

    def _start_over(self):
        """A fresh run: no best model or TensorBoard events of an earlier run survive."""
        if self.main:
            self.best.unlink(missing_ok=True)
            shutil.rmtree(self.out_checkpoint.parent / "tensorboard", ignore_errors=True)
        distributed.barrier()

    def log(self, message):
        if self.main:
            print(message, flush=True)

    def _on_signal(self, signum, frame):
        self.preempted = signal.Signals(signum).name
        print(f"{self.preempted} received: saving state after the current step", flush=True)

    def _stop(self, step, problem):
        """End the run at a non-finite number: one line, nothing declared written."""
        self._close()
        raise CaptionflowError(
            f"{self.name} stopped at epoch {self.progress['epoch']}, step {step}: {problem}; likely cause: {self.hint}; "
            "no checkpoint was written (NaN never becomes one): fix the cause and rerun"
        )

    def stop(self, problem, advice):
        """End the run before the optimizer step at a loss the regime refuses (retrieval's
        loss_explode): one line naming epoch and step, nothing declared written."""
        self._close()
        raise CaptionflowError(
            f"{self.name} stopped at epoch {self.progress['epoch']}, step {self.progress['step'] + 1}: {problem}; "
            f"no checkpoint was written: {advice}"
        )

    def check_finite(self, loss, grad_norm=None):
        """Stop at a non-finite loss or gradient norm: call after backward, before the
        optimizer step, so the weights never take a NaN step. Every rank stops together."""
        problems = []
        if not math.isfinite(loss):
            problems.append(f"the loss is {loss}")
        if grad_norm is not None and not math.isfinite(grad_norm):
            problems.append(f"the gradient norm is {grad_norm}")
        if distributed.any_rank(problems):
            self._stop(
                self.progress["step"] + 1, " and ".join(problems) or "another rank's loss or gradient is not finite"
            )

    def _check_weights(self):
        """After each step: the weights must be finite numbers (the same on every rank)."""
        flags = [torch.isfinite(p).all() for p in self.model.parameters() if p.is_floating_point()]
        if flags and not bool(torch.stack(flags).all()):
            self._stop(self.progress["step"], "the weights are not finite numbers after the optimizer step")

    def _state(self):
        return {
            "key": self.key,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "schedule": self.schedule.state_dict() if self.schedule is not None else None,
            "rng": torch.get_rng_state(),
            "generator": self.generator.get_state(),
            "progress": self.progress,
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
        }

    def save_state(self, background=False):
        """Write state/last.pt; background: from a copy, on the writer thread."""
        if not self.main:
            return
        self.wait_for_writes()
        self._saved_at = time.monotonic()
        if not background:
            checkpoint.save(self._state(), self.last)
            return
        state = _copied(self._state())  # what the step holds now; training goes on meanwhile
        self._writing = threading.Thread(target=self._write, args=(state,), name="state-writer", daemon=True)
        self._writing.start()

    def _write(self, state):
        try:
            checkpoint.save(state, self.last)
        except BaseException as exc:  # noqa: BLE001 - raised on the training thread by wait_for_writes
            self._write_error = exc

    def wait_for_writes(self):
        """Wait for the state write in flight; raise its error if it failed."""
        if self._writing is not None:
            self._writing.join()
            self._writing = None
        if self._write_error is not None:
            error, self._write_error = self._write_error, None
            self._close_bar()  # the error's line starts a line of its own
            raise error

    @property
    def epoch(self):
        return self.progress["epoch"]

    @property
    def step(self):
        return self.progress["step"]

    def running(self):
        return self.progress["epoch"] < self.epochs and self.progress["bad_epochs"] < self.patience

    def remaining(self, batches):
        """Yield the epoch's batches from where the last run stopped. The progress bar counts
        the steps done (`step_done`), not the batches yielded: a reader thread may fetch
        ahead of training."""
        self._close_bar()
        self._bar = tqdm(
            total=len(batches),
            initial=self.progress["batch"],
            desc=f"{self.name} epoch {self.epoch}",
            unit="batch",
            disable=not self.main,
        )
        for b in range(self.progress["batch"], len(batches)):
            yield batches[b]

    def _close_bar(self):
        """End the progress bar's line, so that what is printed next starts a line of its own."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def step_done(self, loss, scalars=None):
        """Count one optimizer step (after it happened); checkpoint every `checkpoint_every`.

        scalars: more per-step values ({name: float}, e.g. SCST's reward) whose epoch means
        become history columns of the same name."""
        p = self.progress
        p["step"] += 1
        self._check_weights()  # before the weights are saved, scored or sampled from
        p["batch"] += 1
        p["loss_sum"] += loss
        p["loss_count"] += 1
        if self._bar is not None:
            self._bar.update(1)
        sums = p.setdefault("scalar_sums", {})  # in the state: a resumed epoch keeps its sums
        for name, value in (scalars or {}).items():
            sums[name] = sums.get(name, 0.0) + value
        if self.main:
            self.writer.add_scalar("train/loss", loss, p["step"])
        preempted = distributed.any_rank(self.preempted)
        if preempted:
            self.save_state()
        elif self.checkpoint_every and p["step"] % self.checkpoint_every == 0:
            self.save_state(background=True)
        elif self.checkpoint_seconds and time.monotonic() - self._saved_at >= self.checkpoint_seconds:
            self.save_state(background=True)  # rank 0 alone decides: only it writes
        if preempted:
            self._close()
            self.log(
                f"preempted ({self.preempted or 'another rank'}): state saved at step {p['step']}; rerun to resume"
            )
            raise SystemExit(1)

    def validate(self, score_fn):
        """The epoch's validation score: `score_fn()` on rank 0, broadcast to every rank."""
        return distributed.broadcast_float(score_fn() if self.main else None)

    def end_epoch(self, score, extra=None):
        """Record the epoch's validation score, keep the best model, save the state.

        score None: an epoch without validation (the best model and patience stay as they
        are); extra: more columns of the epoch's history row."""
        self._close_bar()
        p = self.progress
        lr = self.optimizer.param_groups[0]["lr"] if hasattr(self.optimizer, "param_groups") else ""
        train_loss = p["loss_sum"] / max(1, p["loss_count"])
        row = {
            "epoch": p["epoch"],
            "step": p["step"],
            "train_loss": round(train_loss, 6),
            "val_cider_d": "" if score is None else round(score, 6),
            "lr": lr,
        }
        means = {k: round(v / max(1, p["loss_count"]), 6) for k, v in p.get("scalar_sums", {}).items()}
        p["history"].append({**row, **means, **(extra or {})})
        if self.main:
            if score is not None:
                self.writer.add_scalar("val/cider_d", score, p["step"])
            if lr != "":
                self.writer.add_scalar("train/lr", lr, p["step"])
        if score is None:
            p.update(epoch=p["epoch"] + 1, batch=0, loss_sum=0.0, loss_count=0, scalar_sums={})
            self.save_state()
            return
        if score > p["best_score"]:
            p.update(best_score=score, best_epoch=p["epoch"], bad_epochs=0)
            if self.main:
                checkpoint.save(
                    {**self.meta, **self.export(self.model), "epoch": p["epoch"], "val_cider_d": score}, self.best
                )
        else:
            p["bad_epochs"] += 1
        self.log(
            f"epoch {p['epoch']}: train loss {train_loss:.4f}, {self.score_name} {score:.4f} "
            f"(best {p['best_score']:.4f} at epoch {p['best_epoch']})" + (f", lr {lr:.2e}" if lr != "" else "")
        )
        p.update(epoch=p["epoch"] + 1, batch=0, loss_sum=0.0, loss_count=0, scalar_sums={})
        self.save_state()

    def _close(self):
        self._close_bar()
        if self._writing is not None:  # a write in flight finishes (its error, if any, is moot here)
            self._writing.join()
            self._writing = None
        if self.writer:
            self.writer.close()
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)

    def finish(self):
        """Write the declared outputs: history TSV, then the best checkpoint (last, atomic)."""
        self.wait_for_writes()
        self._close()
        distributed.barrier()
        if not self.main:
            return
        p = self.progress
        if p["bad_epochs"] >= self.patience:
            print(f"early stop: no better {self.score_name} for {self.patience} epochs", flush=True)
        columns = self.history_columns
        rows = ["\t".join(columns)] + ["\t".join(str(h.get(c, "")) for c in columns) for h in p["history"]]
        write_text(self.out_history, "\n".join(rows) + "\n")
        checkpoint.save(checkpoint.load(self.best), self.out_checkpoint)
        # the stage is done: nothing is left that a later (forced) run would resume
        for path in (self.last, self.best, *self.state_dir.glob(".*.tmp")):  # + writes killed mid-way
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # kept if it holds a state set aside as unreadable
            self.state_dir.rmdir()
        print(
            f"best {self.score_name} {p['best_score']:.4f} (epoch {p['best_epoch']}) in {time.time() - self.started:.0f} s",
            flush=True,
        )


def _copied(obj):
    """A copy of a state (dicts, lists, tensors to CPU) that later training steps cannot change."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _copied(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copied(v) for v in obj)
    return obj  # numbers, strings, None: immutable
