"""A stage on a nearly full filesystem (a small tmpfs, mounted as root) fails with one line
that names the disk; after space is freed the rerun completes, equal to an uninterrupted
run, and no temporary file is left behind."""

import os
import subprocess

import h5py
import numpy as np
import pytest

from tests.workflow.conftest import TINY, Workflow, jobs, merge

SAT = merge(
    TINY,
    {
        "experiments": {
            "sat": {
                "model": "show_attend_tell",
                "model_args": {"embed_size": 32, "hidden_size": 64, "att_size": 32},
                "threads": 1,
                "xe": {"epochs": 1, "batch_size": 8, "checkpoint_every": 2},
            }
        }
    },
)


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs; skips where mounting is not allowed (not root, no CAP_SYS_ADMIN)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk, leave):
    """A ballast file that leaves `leave` bytes free on the disk."""
    ballast = disk / "ballast"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(ballast, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, free - leave))
    return ballast


def _features(workflow):
    out = {}
    for split in ("train", "val", "test"):
        with h5py.File(workflow / f"results/features/resnet18/{split}.h5") as f:
            out[split] = {k: np.asarray(f[k]) for k in ("att", "fc", "image_id")}
    return out


@pytest.mark.slow
def test_full_disk_gets_one_line_and_the_rerun_after_freeing_space_matches(tmp_path, small_disk):
    reference = Workflow(tmp_path / "reference", SAT)
    reference.run("extract_features")
    workflow = Workflow(small_disk / "wf", SAT)
    workflow.run("prepro_labels")

    # features: ~0.4 MB to write, 150 kB free
    ballast = _fill(small_disk, 150_000)
    proc = workflow.run("extract_features", check=False)
    log = (workflow / "logs/extract_features.log").read_text()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: disk full: not enough space to write "), log[-2000:]
    assert "train.h5" in errors[0] and "MB more there and rerun" in errors[0]
    assert f"on the filesystem of {small_disk}" in errors[0] and "Traceback" not in log
    assert errors[0] in out  # on the console too
    assert "Trying to restart" not in out

    ballast.unlink()
    workflow.run("extract_features")
    mine, theirs = _features(workflow), _features(reference)
    assert all(np.array_equal(mine[s][k], theirs[s][k]) for s in mine for k in mine[s])

    # training: its state file (model + optimizer) does not fit
    ballast = _fill(small_disk, 200_000)
    proc = workflow.run("train_xe", check=False)
    log = (workflow / "logs/train_xe/sat.log").read_text()
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "Traceback" not in log, log[-2000:]
    assert errors[0].startswith("error: disk full: no space left writing ") and "free more than" in errors[0]
    ballast.unlink()
    assert jobs(workflow.run("train_xe"))["train_xe_job"] == 1
    reference.run("train_xe")
    import torch

    a = torch.load(workflow / "results/sat/xe/model.pt", weights_only=True)["model"]
    b = torch.load(reference / "results/sat/xe/model.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)
    leftovers = [p for p in (workflow / "results").rglob("*") if p.name.endswith((".tmp", ".partial", ".partial.json"))]
    assert leftovers == []
