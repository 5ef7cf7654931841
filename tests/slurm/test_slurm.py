"""The workflow through a real SLURM (slurmctld + slurmd on 127.0.0.1) with profiles/slurm and
snakemake-executor-plugin-slurm: per-stage GPU requests, torchrun (2 processes, gloo) under
SLURM with its checkpoint evaluated by the single-process evaluate job, rerunning one stage by
name, and a cancelled training job resuming from its checkpoint on resubmission."""

import json
import re
import subprocess
import time

import pytest
import yaml

from captionflow.data.store import held_mb
from tests.slurm.localcluster import LocalSlurm, install
from tests.workflow.conftest import REPO, SNAKEMAKE, TINY, merge

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

GPU_RULES = {"extract_features", "train_xe_job", "evaluate_job"}
CPU_RULES = {"resize_images", "prepro_labels", "export_model_job"}

SAT = {"embed_size": 16, "hidden_size": 32, "att_size": 16}
CONFIG = merge(TINY, {
    "experiments": {
        "sat": {
            "model": "show_attend_tell", "model_args": SAT, "threads": 1, "mem_mb": 2000,
            # two processes under torchrun, on the cluster's two (fake) GPUs; long enough to be
            # cancelled mid-training
            "xe": {"epochs": 4, "batch_size": 8, "checkpoint_every": 3, "gpus": 2},
        },
    },
})  # fmt: skip


def site_profile(path):
    """profiles/slurm with its SITE block edited as a user would for this cluster: the
    partitions are already named cpu and gpu; there is no accounting, so no account.
    Status checks every 2 s instead of every 10 s+ keep the test short."""
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    del profile["default-resources"]["slurm_account"]
    profile.update({
        "slurm-no-account": True,
        "slurm-init-seconds-before-status-checks": 2,
        "seconds-between-status-checks": 2,
        "latency-wait": 5,
    })  # fmt: skip
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(profile))
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = install()
    if reason:
        pytest.skip(f"no local SLURM: {reason}")
    slurm = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    yield slurm
    slurm.stop()


class SlurmWorkflow:
    def __init__(self, path, cluster):
        self.path, self.cluster = path, cluster
        self.path.mkdir(parents=True)
        self.profile = site_profile(path.parent / "profile")
        self.write_config(CONFIG)

    def write_config(self, config):
        (self.path / "config.yaml").write_text(yaml.safe_dump(config))

    def popen(self, *args):
        # SIGINT on timeout: Snakemake then cancels its SLURM jobs (a hung status loop ignores SIGTERM)
        command = ["timeout", "-s", "INT", "600", str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"),
                   "--directory", str(self.path), "--profile", str(self.profile), *args]  # fmt: skip
        return subprocess.Popen(command, env=self.cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def run(self, *args):
        proc = self.popen(*args)
        out = proc.communicate()[0]
        assert proc.returncode == 0, f"snakemake {' '.join(args)} failed (status {proc.returncode}):\n{out[-5000:]}"
        return out

    def __truediv__(self, other):
        return self.path / other


def _xe_held_mb(workflow):
    """MB of the train_xe job's HDF5 inputs (features of train and val, labels) its mem_mb adds."""
    features = [*workflow.path.glob("results/features/*/train.h5"), *workflow.path.glob("results/features/*/val.h5")]
    return held_mb([*features, workflow / "results/data/labels.h5"])


def rule_of(job):
    """The rule a SLURM job ran, from the comment the executor plugin gives it."""
    return job.get("Comment", "").removeprefix("rule_").split("_wildcards_")[0]


@pytest.fixture(scope="module")
def dag(cluster, tmp_path_factory):
    """The tiny demo DAG run once through the profile, with its training job cancelled
    (`scancel`) after its first checkpoint; -> (workflow, its SLURM jobs)."""
    workflow = SlurmWorkflow(tmp_path_factory.mktemp("slurm-wf") / "wf", cluster)
    started = time.time()
    proc = workflow.popen()
    state = workflow / "results/sat/xe/state/last.pt"
    while not state.exists() and proc.poll() is None and time.time() < started + 400:
        time.sleep(0.2)
    running = [j for j in cluster.jobs() if rule_of(j) == "train_xe_job" and j["JobState"] == "RUNNING"]
    if state.exists() and len(running) == 1:
        subprocess.run(["scancel", running[0]["JobId"]], env=cluster.env, check=True)
    out = proc.communicate()[0]
    assert proc.returncode == 0, f"snakemake failed (status {proc.returncode}):\n{out[-5000:]}"
    workflow.minutes = (time.time() - started) / 60
    return workflow, cluster.jobs()


def test_dag_runs_through_slurm_with_gpus_only_for_gpu_stages(dag, report_figure):
    workflow, jobs = dag
    metrics = json.loads((workflow / "results/sat/test/metrics.json").read_text())["stages"]
    assert set(metrics) == {"xe"} and metrics["xe"]["metrics"]["CIDEr"] >= 0  # a DDP checkpoint, evaluated
    by_rule = {}
    for job in jobs:
        by_rule.setdefault(rule_of(job), []).append(job)
    assert set(by_rule) == GPU_RULES | CPU_RULES  # cheap rules ran on the submit host
    for rule, attempts in by_rule.items():
        assert attempts[-1]["JobState"] == "COMPLETED" and (len(attempts) == 1 or rule == "train_xe_job"), attempts
    for rule in GPU_RULES:
        for job in by_rule[rule]:
            assert job["Partition"] == "gpu"
            assert job.get("TresPerJob") == ("gres:gpu:2" if rule == "train_xe_job" else "gres:gpu:1"), (rule, job)
    for rule in CPU_RULES:
        job = by_rule[rule][0]
        assert job["Partition"] == "cpu" and "TresPerJob" not in job, (rule, job)
    # memory and minutes come from the rules: the experiment's mem_mb + the HDF5 inputs the job
    # holds in memory, the stage's runtime
    xe = by_rule["train_xe_job"][0]
    assert xe["MinMemoryNode"] == f"{2000 + _xe_held_mb(workflow)}M" and xe["TimeLimit"] == "12:00:00"
    assert "2 processes under torchrun" in (workflow / "logs/train_xe/sat.log").read_text()
    report_figure(f"tiny demo DAG through local SLURM (one training job cancelled and resubmitted): {len(jobs)} jobs in {workflow.minutes:.1f} min")


def test_cancelled_training_job_resumes_from_its_checkpoint(dag):
    workflow, jobs = dag
    attempts = [j for j in jobs if rule_of(j) == "train_xe_job"]
    assert [j["JobState"] for j in attempts] == ["CANCELLED", "COMPLETED"]
    # the second attempt asked for twice the memory and time (retries scale them)
    assert attempts[1]["MinMemoryNode"] == f"{2 * (2000 + _xe_held_mb(workflow))}M" and attempts[1]["TimeLimit"] == "1-00:00:00"
    log = (workflow / "logs/train_xe/sat.log").read_text()  # the resubmitted attempt's log
    resumed = re.search(r"resuming from .*, step (\d+)", log)
    assert resumed and int(resumed.group(1)) >= 3, log[-3000:]
    history = (workflow / "results/sat/xe/history.tsv").read_text().splitlines()
    assert len(history) == 1 + 4 or "early stop" in log


def test_rerunning_one_stage_submits_exactly_that_job(dag, cluster):
    workflow, before = dag
    last = int(before[-1]["JobId"])
    # (README: `--forcerun train_scst_job --until train_scst`; a cheap stage here, same mechanism)
    workflow.run("--forcerun", "prepro_labels", "--until", "prepro_labels")
    new = [j for j in cluster.jobs() if int(j["JobId"]) > last]
    assert [rule_of(j) for j in new] == ["prepro_labels"] and new[0]["JobState"] == "COMPLETED"
