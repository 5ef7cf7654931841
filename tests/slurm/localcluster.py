"""A real one-node SLURM cluster on 127.0.0.1, for the SLURM tests and bench/bench_slurm.py.

Debian's slurmctld, slurmd and munge, started as root in the foreground (so that their
PIDs are ours to stop) with every file in one folder: config, state, spool, logs, the
munge key and socket. Settings that make SLURM run inside a container: process tracking
by parent PID (proctrack/linuxproc), no task plugin and no cgroup.conf; the node
advertises more CPUs and memory than the machine has (SlurmdParameters=config_overrides)
and fake GPUs (two unless asked for more), whose gres.conf File= entries are character devices made here (slurmd
drops GPUs without them). MinJobAge keeps finished jobs visible to squeue and scontrol,
which is what the profile's status command reads (no slurmdbd, so no sacct).

Clients find the config through SLURM_CONF, except one: snakemake-executor-plugin-slurm-jobstep
(0.6.1) strips SLURM_CONF from the `srun` it runs inside each job, so that srun reads the
default path. The cluster therefore also links /etc/slurm/slurm.conf to its config while it
runs (refusing to replace a config it did not make) and removes the link when it stops.
"""

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged", "/usr/sbin/mungekey", "/usr/bin/sbatch"]
PARTITIONS = ("cpu", "gpu")  # the names profiles/slurm uses
DEFAULT_CONF = Path("/etc/slurm/slurm.conf")


def install():
    """Install the Debian packages if missing. -> None, or why this machine cannot."""
    if all(Path(b).exists() for b in BINARIES):
        return None
    if os.geteuid() != 0:
        return "SLURM is not installed and the tests are not running as root (they apt-get install it)"
    if not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    if subprocess.run(command, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            return f"apt-get install {' '.join(PACKAGES)} failed: {proc.stderr.strip().splitlines()[-1:]}"
    return None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """Start with `start()`, stop with `stop()` (every daemon by its PID). `env` is what a
    client (sbatch, squeue, snakemake) needs: SLURM_CONF pointing at this cluster."""

    def __init__(self, root, cpus=16, memory_mb=64000, gpus=2):
        self.root = Path(root)
        self.cpus, self.memory_mb, self.gpus = cpus, memory_mb, gpus
        self.procs = []
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_config(self):
        r = self.root
        for d in ("state", "spool", "munge", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "munge").chmod(0o700)
        gpu_files = []
        for i in range(self.gpus):
            dev = r / f"fakegpu{i}"
            if not dev.exists():
                os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))  # a character device, like /dev/null
            gpu_files.append(str(dev))
        self.socket = r / "munge/munge.socket"
        lines = [
            "ClusterName=captionflow-test",
            "SlurmctldHost=localhost(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.socket}",
            "CredType=cred/munge",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log/slurmctld.log'}",
            f"SlurmdLogFile={r / 'log/slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "GresTypes=gpu",
            "MinJobAge=600",  # finished jobs stay visible to squeue/scontrol for 10 minutes
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "KillWait=10",  # seconds between SIGTERM and SIGKILL when a job is cancelled
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} "
            f"Gres=gpu:fake:{self.gpus} State=UNKNOWN",
        ]
        for i, name in enumerate(PARTITIONS):
            lines.append(
                f"PartitionName={name} Nodes=localhost Default={'YES' if i == 0 else 'NO'} MaxTime=INFINITE State=UP"
            )
        self.conf.write_text("\n".join(lines) + "\n")
        (r / "gres.conf").write_text("".join(f"NodeName=localhost Name=gpu Type=fake File={f}\n" for f in gpu_files))

    def _spawn(self, name, command):
        log = open(self.root / f"log/{name}.out", "w")
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def start(self, timeout=60):
        self._write_config()
        if DEFAULT_CONF.is_symlink():
            DEFAULT_CONF.unlink()  # a link left by a killed run of ours
        if DEFAULT_CONF.exists():
            raise RuntimeError(f"{DEFAULT_CONF} exists: this machine has its own SLURM, not replaced by the tests")
        DEFAULT_CONF.parent.mkdir(parents=True, exist_ok=True)
        DEFAULT_CONF.symlink_to(self.conf)
        key = self.root / "munge/munge.key"
        if not key.exists():
            subprocess.run(["/usr/sbin/mungekey", "--create", f"--keyfile={key}"], check=True)
            key.chmod(0o600)
        m = self.root / "munge"
        self._spawn(
            "munged",
            [
                "/usr/sbin/munged",
                "--foreground",
                "--force",
                f"--socket={self.socket}",
                f"--key-file={key}",
                f"--log-file={m / 'munged.log'}",
                f"--pid-file={m / 'munged.pid'}",
                f"--seed-file={m / 'munged.seed'}",
            ],
        )
        self._wait(lambda: self.socket.exists(), timeout, "munged did not create its socket")
        self._spawn("slurmctld", ["/usr/sbin/slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(
            lambda: self._run("scontrol", "ping").returncode == 0, timeout, "slurmctld did not answer scontrol ping"
        )
        self._spawn("slurmd", ["/usr/sbin/slurmd", "-D", "-N", "localhost", "-f", str(self.conf)])
        self._wait(
            lambda: "idle" in self._run("sinfo", "-h", "-o", "%T").stdout, timeout, "the node did not become idle"
        )
        return self

    def _run(self, *command):
        return subprocess.run(command, env=self.env, capture_output=True, text=True)

    def _wait(self, ready, timeout, what):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, proc in self.procs:
                if proc.poll() is not None:
                    log = (self.root / f"log/{name}.out").read_text()[-2000:]
                    self.stop()
                    raise RuntimeError(f"{name} exited with status {proc.returncode}:\n{log}")
            if ready():
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"local SLURM: {what} within {timeout} s (logs in {self.root / 'log'})")

    def jobs(self):
        """Every job slurmctld still knows (running, pending, and finished within MinJobAge):
        a list of dicts of `scontrol show job -o` fields (JobId, JobState, Comment, TresPerJob, ...)."""
        out = self._run("scontrol", "show", "job", "-o").stdout
        jobs = []
        for line in out.splitlines():
            if not line.startswith("JobId="):
                continue
            fields = {}
            for token in line.split():
                if "=" in token:
                    k, v = token.split("=", 1)
                    fields[k] = v
            jobs.append(fields)
        return sorted(jobs, key=lambda j: int(j["JobId"]))

    def stop(self):
        """Stop every daemon this object started, by PID, in reverse order."""
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
        self.procs = []
        if DEFAULT_CONF.is_symlink() and DEFAULT_CONF.resolve() == self.conf.resolve():
            DEFAULT_CONF.unlink()
