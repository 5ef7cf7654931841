"""The own-data recipe of docs/own-data.md, run as written from a directory outside the
repository: no --profile (the workflow profile beside the Snakefile is found), the config
in use printed at start, the metrics table at the end; no retry of a deterministic failure."""

import json
import subprocess

import pytest
import yaml

from captionflow.data.demo import make_demo_dataset
from tests.conftest import scaled
from tests.workflow.conftest import REPO, SNAKEMAKE

CONFIG = {
    "experiments": {
        "mine": {
            "model": "fc",
            "model_args": {"embed_size": 16, "hidden_size": 32},
            "stages": ["xe", "scst"],
            "threads": 1,
            "xe": {"epochs": 1, "batch_size": 8},
            "scst": {"epochs": 1, "batch_size": 4},
            "evaluate": {"beam_size": 2},
        }
    },
    "data": {"source": "karpathy", "karpathy_json": "../photos/dataset_coco.json", "images_root": "../photos"},
    "resize": {"size": 64, "threads": 1},
    "features": {"batch_size": 4, "num_workers": 0, "threads": 1},
}


def snakemake(cwd, *args):
    """The documented command: `snakemake -s /path/to/captionflow/Snakefile --cores all`, nothing else."""
    command = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--cores", "all", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=scaled(900))


@pytest.fixture
def photos(tmp_path):
    """A small Karpathy-schema dataset of the user's own: images and dataset_coco.json."""
    root = tmp_path / "photos"
    make_demo_dataset(
        root / "dataset_coco.json",
        root / "images",
        {"train": 24, "restval": 0, "val": 6, "test": 6},
        seed=3,
        min_side=64,
        max_side=80,
    )
    return root


@pytest.mark.slow
def test_own_data_from_outside_the_repository_prints_the_metrics_table(tmp_path, photos):
    run = tmp_path / "my_run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    before = sorted(p.relative_to(photos) for p in photos.rglob("*"))

    proc = snakemake(run)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert f"workflow specific profile {REPO / 'profiles/default'}" in out
    assert f"captionflow: config {run / 'config.yaml'}" in out

    # the table at the end: the numbers of the stages' metrics files, and where things are
    summary = out[out.index("mine (test split)") :]
    for stage in ("xe", "scst"):
        metrics = json.loads((run / f"results/mine/test/{stage}/metrics.json").read_text())["metrics"]
        row = next(line for line in summary.splitlines() if line.split()[:1] == [stage])
        assert row.split()[1:5] == [f"{metrics[k]:.3f}" for k in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr")]
        assert (
            f"{stage}: checkpoint results/mine/{stage}/model.pt · predictions results/mine/test/{stage}/predictions.json"
            in summary
        )
    signature = (run / "results/mine/scst/reward.txt").read_text().strip()
    assert f"scst reward: {signature}" in summary
    assert (
        sorted(p.relative_to(photos) for p in photos.rglob("*")) == before
    )  # nothing written beside the user's images

    # a deterministic failure (an image that cannot be decoded) is reported once, not retried
    (photos / "images/demo_000003.jpg").write_bytes(b"not a jpeg")
    (run / "config.yaml").write_text(yaml.safe_dump({**CONFIG, "resize": {"size": 48, "threads": 1}}))
    proc = snakemake(run)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "error: bad image" in out and "Trying to restart" not in out


def test_a_directory_without_config_says_it_runs_the_demo(tmp_path):
    proc = snakemake(tmp_path, "-n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        f"captionflow: no config.yaml in {tmp_path}: running the embedded demo ({REPO / 'config.yaml'})" in proc.stderr
    )
