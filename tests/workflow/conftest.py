"""Run the real Snakefile with real Snakemake on a tiny generated config in a temp dir."""

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.conftest import scaled

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")

# Small enough that the data half runs in seconds on 2 CPU cores. No experiments: the
# data-half tests stop at the features.
TINY = {
    "data": {"demo": {"splits": {"train": 24, "restval": 4, "val": 6, "test": 6}, "min_side": 64, "max_side": 96}},
    "resize": {"size": 64, "threads": 2},
    "features": {"batch_size": 4, "num_workers": 0, "chunk_batches": 1, "threads": 1},
}


def merge(base, over):
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


class Workflow:
    """A working directory with its own config, driven through the snakemake CLI."""

    def __init__(self, path, config):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.set_config(config)

    def set_config(self, config):
        self.config = config
        (self.path / "config.yaml").write_text(yaml.safe_dump(config))  # read from the working directory

    def command(self, *args):
        return [
            str(SNAKEMAKE),
            "--snakefile",
            str(REPO / "Snakefile"),
            "--directory",
            str(self.path),
            "--cores",
            str(len(os.sched_getaffinity(0))),  # one CPU per process under `make test`
            "--show-failed-logs",
            *args,
        ]

    def run(self, *args, check=True, timeout=600):
        proc = subprocess.run(self.command(*args), capture_output=True, text=True, timeout=scaled(timeout))
        if check and proc.returncode != 0:
            raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
        return proc

    def run_until(self, marker, *args, timeout=300):
        """Run `snakemake *args` and SIGKILL its whole process group once `marker` exists.

        Returns whether the marker appeared (False: the job ended or failed first).
        """
        proc = subprocess.Popen(
            self.command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            deadline = time.time() + scaled(timeout)
            while not marker.exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.002)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.run("--unlock")  # a killed Snakemake leaves its lock behind
        return marker.exists()

    def __truediv__(self, other):
        return self.path / other


def jobs(proc):
    """Counter of the rules Snakemake scheduled (run or dry run), from its output."""
    return Counter(re.findall(r"^\s*(?:local)?rule (\w+):$", proc.stdout + proc.stderr, re.M))


@pytest.fixture
def workflow(tmp_path):
    return Workflow(tmp_path / "wf", TINY)
