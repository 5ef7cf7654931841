"""Resumable states by time (`checkpoint_minutes`) as well as by steps, written off the
training thread: a SIGKILL after a time-based state resumes to identical weights, the
written state is the step's even while training goes on, and a failed write stops the run."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from captionflow.config import build
from captionflow.models import checkpoint
from captionflow.training import xe
from captionflow.training.loop import TrainingRun
from captionflow.training.xe import XEConfig

MODEL_ARGS = {"embed_size": 16, "hidden_size": 32, "att_size": 16, "dropout": 0.2}
# 13 batches per epoch on tiny_data; a state after every step by time, none by steps
BY_TIME = dict(epochs=2, batch_size=8, checkpoint_every=0, checkpoint_minutes=1e-9, warmup_steps=2)


def _args(data, out):
    return (
        data / "train.h5",
        data / "val.h5",
        data / "labels.h5",
        data / "labels.json",
        data / "references.json",
        out / "model.pt",
        out / "history.tsv",
        "show_attend_tell",
        MODEL_ARGS,
    )


def test_sigkill_after_a_time_based_state_resumes_to_identical_weights(tiny_data, tmp_path):
    reference_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    xe.train(*_args(tiny_data, reference_dir), build(XEConfig, **BY_TIME))
    reference = checkpoint.load(reference_dir / "model.pt")

    # the same run in another process, SIGKILLed once a state of epoch 1 exists
    script = textwrap.dedent(f"""
        from pathlib import Path
        from captionflow.training import xe
        from captionflow.config import build
        from captionflow.training.xe import XEConfig
        from tests.unit.test_checkpoint_time import BY_TIME, _args
        xe.train(*_args(Path({str(tiny_data)!r}), Path({str(run_dir)!r})), build(XEConfig, **BY_TIME))
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=os.getcwd(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    last, deadline = run_dir / "state/last.pt", time.time() + 120
    step = 0
    while proc.poll() is None and time.time() < deadline:
        if last.exists():
            try:
                step = torch.load(last, weights_only=True)["progress"]["step"]
            except Exception:  # noqa: BLE001 - replaced while read: try again
                continue
            if step >= 16:
                break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 16 <= step < 26 and not (run_dir / "model.pt").exists(), f"killed at step {step}"

    xe.train(*_args(tiny_data, run_dir), build(XEConfig, **BY_TIME))
    resumed = checkpoint.load(run_dir / "model.pt")
    assert all(torch.equal(reference["model"][k], resumed["model"][k]) for k in reference["model"])
    assert (run_dir / "history.tsv").read_text() == (reference_dir / "history.tsv").read_text()


def test_without_steps_or_minutes_due_only_epoch_ends_write_states(tiny_data, tmp_path, monkeypatch):
    saves = []
    real = TrainingRun.save_state
    monkeypatch.setattr(
        TrainingRun,
        "save_state",
        lambda self, background=False: (saves.append(self.progress["step"]), real(self, background))[1],
    )
    xe.train(*_args(tiny_data, tmp_path / "half-hour"), build(XEConfig, **{**BY_TIME, "checkpoint_minutes": 30.0}))
    assert saves == [13, 26]  # the two epoch ends
    saves.clear()
    xe.train(*_args(tiny_data, tmp_path / "by-time"), build(XEConfig, **BY_TIME))
    assert saves == [*range(1, 14), 13, *range(14, 27), 26]  # every step by time, and the epoch ends


def _run(tmp_path, model):
    return TrainingRun(
        tmp_path / "model.pt",
        tmp_path / "history.tsv",
        "key",
        {},
        model,
        None,
        None,
        torch.Generator(),
        1,
        1,
        0,
        "test",
    )


def test_a_background_state_is_the_steps_even_while_training_goes_on(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    run = _run(tmp_path, model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    slow, real = threading.Event(), checkpoint.save

    def slow_save(obj, path):
        slow.wait(5)  # the write starts only after the weights changed
        real(obj, path)

    monkeypatch.setattr(checkpoint, "save", slow_save)
    run.save_state(background=True)
    with torch.no_grad():
        model.weight.add_(1.0)  # the next optimizer step, in place
    slow.set()
    run.wait_for_writes()
    saved = torch.load(tmp_path / "state/last.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], before[k]) for k in before)


def test_a_failed_background_write_stops_the_run_at_the_next_save(tmp_path, monkeypatch):
    run = _run(tmp_path, torch.nn.Linear(3, 2))

    def full_disk(obj, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save", full_disk)
    run.save_state(background=True)
    with pytest.raises(OSError, match="No space left"):
        run.save_state(background=True)
    assert not [t for t in threading.enumerate() if t.name == "state-writer"]


def test_the_fp16_loss_scale_resumes_with_the_state(tmp_path):
    # a CPU GradScaler stands in for CUDA's (this machine has no GPU): same state dict
    def run_with(scaler):
        return TrainingRun(
            tmp_path / "model.pt",
            tmp_path / "history.tsv",
            "key",
            {},
            torch.nn.Linear(3, 2),
            None,
            None,
            torch.Generator(),
            1,
            1,
            0,
            "test",
            scaler=scaler,
        )

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.scale(torch.ones(()))  # the scale exists once used
    scaler.update(new_scale=512.0)  # e.g. lowered after inf gradients
    run_with(scaler).save_state()
    resumed = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    run_with(resumed)  # finds state/last.pt with the same key: resumes
    assert resumed.get_scale() == 512.0
