# Scheduler requests: GPUs, CPUs per GPU, nodes, memory and minutes of the jobs whose
# needs come from the config (memory and minutes grow with each retry). The SLURM
# profile's partition file sends a job to a GPU partition iff it asks for GPUs.


def gpus_for(device, count=1):
    """GPUs a job asks the scheduler for: none when it is pinned to the CPU."""
    return 0 if device == "cpu" else count


def feature_resources():
    """Of extract_features, extract_regions and the regenerate_* jobs (config `features`)."""
    section = config["features"]
    return dict(
        gpu=gpus_for(section["device"]),
        cpus_per_gpu=section["threads"],
        mem_mb=lambda wildcards, attempt: section["mem_mb"] * attempt,
        runtime=lambda wildcards, attempt: section["runtime"] * attempt,
    )


def job_memory(wildcards, input, attempt):
    """mem_mb of an experiment's training or evaluation job: the experiment's mem_mb plus
    the HDF5 inputs it holds in memory (captionflow.data.store.held_mb: feature files up to
    4 GiB; larger ones stream in bounded batches and add nothing), sized when the job is
    about to run; a retry asks for attempt x that."""
    from captionflow.data.store import held_mb

    return (EXPERIMENTS[wildcards.experiment]["mem_mb"] + held_mb(input)) * attempt


def stage_resources(stage):
    """Of an experiment's `stage` job: GPUs (none with device cpu), CPUs per GPU (the
    experiment's threads; a job without GPUs asks for its threads per task), one node,
    memory (`job_memory`) and minutes."""

    def section(wildcards):
        return stage_section(wildcards.experiment, stage)

    return dict(
        # e2e and evaluate run one process: their sections have no `gpus` key
        gpu=lambda wildcards: gpus_for(
            section(wildcards)["device"], section(wildcards).get("gpus", 1)
        ),
        cpus_per_gpu=lambda wildcards: EXPERIMENTS[wildcards.experiment]["threads"],
        nodes=1,  # torchrun --standalone: every GPU of the job on one node
        mem_mb=job_memory,
        runtime=lambda wildcards, attempt: section(wildcards)["runtime"] * attempt,
    )


def ensemble_resources():
    """Of evaluate_ensemble_job: one GPU (none with device cpu), the ensemble's threads,
    memory and minutes."""

    def ensemble(wildcards):
        return ENSEMBLES[wildcards.ensemble]

    return dict(
        gpu=lambda wildcards: gpus_for(ensemble(wildcards)["evaluate"]["device"], 1),
        cpus_per_gpu=lambda wildcards: ensemble(wildcards)["threads"],
        mem_mb=lambda wildcards, attempt: ensemble(wildcards)["mem_mb"] * attempt,
        runtime=lambda wildcards, attempt: ensemble(wildcards)["evaluate"]["runtime"]
        * attempt,
    )
