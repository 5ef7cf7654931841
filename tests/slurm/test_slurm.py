"""The demo's DAG through a real SLURM (slurmctld + slurmd on 127.0.0.1, a `cpu` and a `gpu`
partition, four fake GPUs) with profiles/slurm copied into a project folder outside the
repository, as docs/cluster.md says: every job on the partition its GPU request calls for, its
CPUs those of its rule, a 2-GPU torchrun job started once, a cancelled training job resumed
from its checkpoint, one stage rerun by name."""

import json
import re
import shutil
import subprocess
import time

import pytest
import yaml

from captionflow.data.store import held_mb
from tests.conftest import scaled
from tests.slurm.localcluster import LocalSlurm, install
from tests.workflow.conftest import REPO, SNAKEMAKE, TINY, jobs, merge

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

# Every rule the demo config schedules, by where its jobs run. A rule whose stage has a
# `device` setting can use a GPU: its jobs must ask for one (and land on the GPU partition)
# unless that stage is pinned to the CPU. A rule that is in none of these sets fails
# test_every_scheduled_rule_is_classified: a new rule must be placed here.
GPU_RULES = {
    "extract_features",
    "regenerate_features_job",
    "regenerate_scst_e2e_features_job",
    "train_xe_job",
    "finetune_e2e_job",
    "train_scst_job",
    "train_scst_e2e_job",
    "train_es_job",
    "train_retrieval_job",
    "evaluate_job",
    "evaluate_ensemble_job",
}
CPU_RULES = {
    "resize_images",
    "prepro_labels",
    "prepro_cider_df",
    "evaluate_retrieval_job",
    "export_model_job",
    "export_ensemble_job",
}
LOCAL_RULES = {  # on the submit host (localrule): never submitted
    "make_demo_dataset",
    "report_metrics_job",
    "report_ensemble_job",
    "plot_experiment_job",
    "plot_attention_job",
    "report_tables",
    "all",
}

THREADS = 4  # more than the submit host has (2 cores; 1 per pytest-xdist worker)
CPU_EXPERIMENT = "on_cpu"  # every stage with device: cpu
CANCELLED = "fc"  # its XE job is cancelled after its first checkpoint, off the DAG's longest chain
XE_EPOCHS = 2  # of that XE: 18 steps an epoch, its first checkpoint at step 3


def demo_config():
    """The demo config (config.yaml) on TINY data with short stages, plus an experiment
    pinned to the CPU. show_attend_tell's XE runs on 2 GPUs (torchrun); fc's XE is long
    enough to be cancelled after its first checkpoint."""
    config = merge(yaml.safe_load((REPO / "config.yaml").read_text()), TINY)
    config["resize"]["threads"] = THREADS
    for experiment in config["experiments"].values():
        experiment.update(threads=THREADS, mem_mb=2000)
        for stage in ("xe", "e2e", "scst", "scst_e2e", "retrieval"):
            if stage in experiment:
                experiment[stage]["epochs"] = 1
        if "es" in experiment:
            experiment["es"].update(iterations=2, offspring=4)
    for ensemble in config["ensembles"].values():
        ensemble["threads"] = THREADS
    config["experiments"]["show_attend_tell"]["xe"]["gpus"] = 2
    config["experiments"][CANCELLED]["xe"].update(epochs=XE_EPOCHS, batch_size=8, checkpoint_every=3)
    config["experiments"][CPU_EXPERIMENT] = {
        "model": "fc",
        "model_args": {"embed_size": 16, "hidden_size": 32},
        "stages": ["xe"],
        "threads": 3,
        "mem_mb": 2000,
        "xe": {"epochs": 1, "device": "cpu"},
        "evaluate": {"device": "cpu"},
    }
    return config


def site_profile(path):
    """profiles/slurm copied as docs/cluster.md says, its SITE block edited for this cluster: the
    partitions are already named cpu and gpu (partitions.yaml kept as shipped); there is no
    accounting, so no account. Status checks every 2 s keep the test short."""
    shutil.copytree(REPO / "profiles/slurm", path)
    profile = yaml.safe_load((path / "config.yaml").read_text())
    del profile["default-resources"]["slurm_account"]
    profile.update(
        {
            "slurm-no-account": True,
            "slurm-init-seconds-before-status-checks": 1,
            "seconds-between-status-checks": 2,
            "latency-wait": 5,
        }
    )
    (path / "config.yaml").write_text(yaml.safe_dump(profile))
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = install()
    if reason:
        pytest.skip(f"no local SLURM: {reason}")
    slurm = LocalSlurm(tmp_path_factory.mktemp("slurm"), gpus=4).start()  # GPU stages of several experiments at once
    yield slurm
    slurm.stop()


class SlurmWorkflow:
    """A project folder outside the repository, run from inside it as docs/cluster.md says:
    `snakemake -s <repo>/Snakefile --profile <its copy of profiles/slurm>`."""

    def __init__(self, path, cluster, config):
        self.path, self.cluster = path, cluster
        self.path.mkdir(parents=True)
        self.profile = site_profile(path / "slurm")
        (self.path / "config.yaml").write_text(yaml.safe_dump(config))

    def popen(self, *args):
        # SIGINT on timeout: Snakemake then cancels its SLURM jobs (a hung status loop ignores SIGTERM)
        command = [
            "timeout",
            "-s",
            "INT",
            str(round(scaled(1000))),
            str(SNAKEMAKE),
            "-s",
            str(REPO / "Snakefile"),
            "--profile",
            "slurm",
            *args,
        ]
        return subprocess.Popen(
            command, cwd=self.path, env=self.cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

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


def experiment_of(job):
    """The job's wildcard values joined by "_", experiment (or ensemble) first: `on_cpu_xe`
    for evaluate_job of experiment on_cpu, stage xe."""
    return job.get("Comment", "").partition("_wildcards_")[2]


def on_cpu(job):
    """Whether a job belongs to the experiment pinned to the CPU (no other name starts so)."""
    return experiment_of(job).startswith(CPU_EXPERIMENT)


def gpus_of(job):
    """GPUs the job asked for (sbatch --gpus=N shows as TresPerJob=gres/gpu:N)."""
    match = re.search(r"gpu(?::\w+)?:(\d+)", job.get("TresPerJob", ""))
    return int(match.group(1)) if match else 0


@pytest.fixture(scope="module")
def dag(cluster, tmp_path_factory):
    """The demo DAG run once through the profile, with fc's training job
    cancelled (`scancel`) after its first checkpoint; -> (workflow, its SLURM jobs, the
    rules a dry run scheduled)."""
    workflow = SlurmWorkflow(tmp_path_factory.mktemp("slurm-wf") / "project", cluster, demo_config())
    planned = jobs(
        subprocess.run(
            [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-n", "--cores", "1"],
            cwd=workflow.path,
            capture_output=True,
            text=True,
        )
    )
    started = time.time()
    proc = workflow.popen()
    state = workflow / f"results/{CANCELLED}/xe/state/last.pt"
    while not state.exists() and proc.poll() is None and time.time() < started + 600:
        time.sleep(0.2)
    running = [
        j
        for j in cluster.jobs()
        if rule_of(j) == "train_xe_job" and experiment_of(j) == CANCELLED and j["JobState"] == "RUNNING"
    ]
    if state.exists() and len(running) == 1:
        subprocess.run(["scancel", running[0]["JobId"]], env=cluster.env, check=True)
    out = proc.communicate()[0]
    assert proc.returncode == 0, f"snakemake failed (status {proc.returncode}):\n{out[-5000:]}"
    workflow.minutes = (time.time() - started) / 60
    return workflow, cluster.jobs(), planned


def test_every_scheduled_rule_is_classified(dag):
    _, submitted, planned = dag
    assert set(planned) == GPU_RULES | CPU_RULES | LOCAL_RULES, (
        "classify the new rule in GPU_RULES, CPU_RULES or LOCAL_RULES"
    )
    assert {rule_of(j) for j in submitted} == GPU_RULES | CPU_RULES  # local rules ran on the submit host


def test_a_job_is_on_the_gpu_partition_iff_it_asks_for_gpus(dag, report_figure):
    workflow, submitted, planned = dag
    metrics = json.loads((workflow / "results/show_attend_tell/test/metrics.json").read_text())["stages"]
    assert set(metrics) == {"xe", "e2e", "scst", "scst_e2e"}  # the whole demo chain, a DDP checkpoint at its start
    for job in submitted:
        rule, gpus = rule_of(job), gpus_of(job)
        assert job["JobState"] == "COMPLETED" or (rule == "train_xe_job" and job["JobState"] == "CANCELLED"), job
        assert job["Partition"] == ("gpu" if gpus else "cpu"), (rule, job)
        if rule in GPU_RULES:  # GPU stages ask for a GPU, except where the stage's device is cpu
            assert (gpus > 0) == (not on_cpu(job)), (rule, job)
        else:
            assert gpus == 0, (rule, job)
    assert sorted(rule_of(j) for j in submitted if on_cpu(j)) == ["evaluate_job", "export_model_job", "train_xe_job"]
    report_figure(
        f"demo DAG through local SLURM: {len(submitted)} jobs ({sum(1 for j in submitted if gpus_of(j))} on the gpu partition), "
        f"{sum(planned.values()) - len(submitted)} local, in {workflow.minutes:.1f} min"
    )


def test_a_jobs_cpus_are_its_rules_threads_not_the_submit_hosts(dag):
    _, submitted, _ = dag
    seen = set()
    for job in submitted:
        rule = rule_of(job)
        if gpus_of(job):  # --cpus-per-gpu: the experiment's (or features') threads
            threads = 1 if rule == "extract_features" or rule.startswith("regenerate") else THREADS
            assert job.get("CpusPerTres") == f"gres:gpu:{threads}", (rule, job)
            seen.add("gpu")
        elif rule == "resize_images":  # --cpus-per-task
            assert int(job["NumCPUs"]) == THREADS, (rule, job)
            seen.add(rule)
        elif rule in GPU_RULES:  # pinned to the CPU: --cpus-per-task
            assert on_cpu(job) and int(job["NumCPUs"]) == 3, (rule, job)
            seen.add(rule)
    assert seen == {"gpu", "resize_images", "train_xe_job", "evaluate_job"}


def test_a_two_gpu_job_starts_one_torchrun_of_world_size_two(dag):
    workflow, submitted, _ = dag
    xe = [j for j in submitted if rule_of(j) == "train_xe_job" and experiment_of(j) == "show_attend_tell"]
    assert len(xe) == 1 and all(gpus_of(j) == 2 and j["NumTasks"] == "1" and j["NumNodes"] == "1" for j in xe), xe
    log = (workflow / "logs/train_xe/show_attend_tell.log").read_text()
    assert log.count("processes under torchrun") == 1, log[-3000:]
    assert sorted(re.findall(r"worker rank (\d) of (\d)", log)) == [("0", "2"), ("1", "2")], log[-3000:]


def test_cancelled_training_job_resumes_from_its_checkpoint(dag):
    workflow, submitted, _ = dag
    attempts = [j for j in submitted if rule_of(j) == "train_xe_job" and experiment_of(j) == CANCELLED]
    assert [j["JobState"] for j in attempts] == ["CANCELLED", "COMPLETED"]
    # the second attempt asked for twice the memory and time (retries scale them): the
    # experiment's mem_mb + the HDF5 inputs the job holds in memory, the stage's runtime
    assert attempts[0]["MinMemoryNode"] == f"{2000 + _xe_held_mb(workflow)}M" and attempts[0]["TimeLimit"] == "12:00:00"
    assert (
        attempts[1]["MinMemoryNode"] == f"{2 * (2000 + _xe_held_mb(workflow))}M"
        and attempts[1]["TimeLimit"] == "1-00:00:00"
    )
    log = (workflow / f"logs/train_xe/{CANCELLED}.log").read_text()  # the resubmitted attempt's
    resumed = re.search(r"resuming from .*, step (\d+)", log)
    assert resumed and int(resumed.group(1)) >= 3, log[-3000:]
    history = (workflow / f"results/{CANCELLED}/xe/history.tsv").read_text().splitlines()
    assert len(history) == 1 + XE_EPOCHS or "early stop" in log


def test_rerunning_one_stage_submits_exactly_that_job(dag, cluster):
    workflow, before, _ = dag
    last = int(before[-1]["JobId"])
    # (docs/cluster.md: `--forcerun train_scst --until train_scst`; a cheap stage here, same mechanism)
    workflow.run("--forcerun", "prepro_labels", "--until", "prepro_labels")
    new = [j for j in cluster.jobs() if int(j["JobId"]) > last]
    assert [rule_of(j) for j in new] == ["prepro_labels"] and new[0]["JobState"] == "COMPLETED"


def test_the_report_builds_from_the_project_folder(dag):
    """The last command of docs/cluster.md's recipe, from the project folder outside the repository."""
    workflow, _, _ = dag
    proc = subprocess.run(
        [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--report", "report.html"],
        cwd=workflow.path,
        capture_output=True,
        text=True,
        timeout=scaled(300),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    html = (workflow / "report.html").read_text()
    assert "show_attend_tell" in html and CPU_EXPERIMENT in html
