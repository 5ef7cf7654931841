"""Benchmark the scheduler overhead per stage on a local one-node SLURM (needs root + apt).

    python bench/bench_slurm.py [--jobs 5] [--chain 3]

Starts the test cluster of tests/slurm/localcluster.py, then measures, in one run:
1. bare SLURM: `sbatch --wrap true` from submission to COMPLETED (squeue polled every 50 ms);
2. Snakemake: a chain of empty rules through profiles/slurm (its SITE block edited for this
   cluster), once with the profile's status-check timings and once with 2 s ones, against
   the same chain run locally (`--cores 1`), the reference. Overhead per stage =
   (SLURM wall - local wall) / chain length.
"""

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.slurm.localcluster import LocalSlurm, install  # noqa: E402

SNAKEMAKE = Path(sys.executable).with_name("snakemake")


def bare_job_seconds(cluster, n):
    times = []
    for _ in range(n):
        started = time.perf_counter()
        job = subprocess.run(
            ["sbatch", "--parsable", "-o", "/dev/null", "--wrap", "true"],
            env=cluster.env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        while True:
            state = subprocess.run(
                ["squeue", "-h", "-t", "all", "-j", job, "-o", "%T"], env=cluster.env, capture_output=True, text=True
            ).stdout.strip()
            if state in ("COMPLETED", "FAILED", "CANCELLED"):
                break
            time.sleep(0.05)
        times.append(time.perf_counter() - started)
    return times


def chain_snakefile(path, n):
    rules = [f"rule all:\n    input: 'out/step{n - 1}'\n    localrule: True\n"]
    for i in range(n):
        src = f"    input: 'out/step{i - 1}'\n" if i else ""
        rules.append(
            f"rule step{i}:\n{src}    output: 'out/step{i}'\n    resources: runtime=5, mem_mb=100\n    shell: 'touch {{output}}'\n"
        )
    path.write_text("\n".join(rules))


def chain_seconds(workdir, snakefile, env, *args):
    subprocess.run(["rm", "-rf", str(workdir / "out"), str(workdir / ".snakemake")], check=True)
    started = time.perf_counter()
    subprocess.run(
        [str(SNAKEMAKE), "-s", str(snakefile), "-d", str(workdir), *args], env=env, check=True, capture_output=True
    )
    return time.perf_counter() - started


def profile(path, fast):
    """profiles/slurm copied (its partitions.yaml too), the SITE block edited for this cluster."""
    shutil.copytree(REPO / "profiles/slurm", path, dirs_exist_ok=True)
    p = yaml.safe_load((path / "config.yaml").read_text())
    del p["default-resources"]["slurm_account"]
    p["slurm-no-account"] = True
    if fast:
        p.update({"slurm-init-seconds-before-status-checks": 2, "seconds-between-status-checks": 2})
    (path / "config.yaml").write_text(yaml.safe_dump(p))
    return path


def main():
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--jobs", type=int, default=5)
    a.add_argument("--chain", type=int, default=3)
    args = a.parse_args()
    reason = install()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cluster = LocalSlurm(tmp / "cluster").start()
        try:
            bare = bare_job_seconds(cluster, args.jobs)
            print(
                f"bare sbatch 'true', submission -> COMPLETED: median {statistics.median(bare):.2f} s "
                f"(min {min(bare):.2f}, max {max(bare):.2f}, {args.jobs} jobs)"
            )
            snakefile = tmp / "Snakefile"
            chain_snakefile(snakefile, args.chain)
            local = chain_seconds(tmp / "wf", snakefile, cluster.env, "--cores", "1")
            print(f"{args.chain} empty rules, local --cores 1 (reference): {local:.1f} s")
            for name, fast in (("profile as shipped", False), ("2 s status checks", True)):
                wall = chain_seconds(
                    tmp / "wf", snakefile, cluster.env, "--profile", str(profile(tmp / name.replace(" ", "_"), fast))
                )
                print(
                    f"{args.chain} empty rules through profiles/slurm ({name}): {wall:.1f} s = "
                    f"{(wall - local) / args.chain:.1f} s overhead per stage, {wall / local:.1f}x the local run"
                )
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
