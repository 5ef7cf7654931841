# Input functions: the files a job reads that depend on its experiment (or ensemble) and
# on the config. Each takes the job's wildcards; those used with `unpack` return a dict of
# named inputs (empty when the job needs none of them).


def resize_inputs(wildcards):
    """The caption file, plus the generated image folder when the demo is the source."""
    inputs = {"captions": CAPTIONS}
    if DEMO:
        inputs["images"] = DEMO_IMAGES
    return inputs


def stage_features(split, stage=None):
    """The features a stage (or the wildcard's stage) reads."""
    return lambda wildcards: features_of(
        wildcards.experiment, stage or wildcards.stage, split
    )


def previous_checkpoint(wildcards):
    """The checkpoint of the stage before SCST (xe, or e2e when it ran)."""
    order = stages(wildcards.experiment)
    return model_file(wildcards.experiment, order[order.index("scst") - 1])


def es_init(wildcards):
    """Of train_es_job: the XE checkpoint it starts from, if XE ran."""
    if "xe" in stages(wildcards.experiment):
        return {"init": model_file(wildcards.experiment, "xe")}
    return {}


def retrieval_images(wildcards):
    """Of train_retrieval_job and evaluate_retrieval_job: the resized images' manifest, for
    a retrieval model fine-tuned end to end."""
    if not retrieval_end_to_end(wildcards.experiment):
        return {}
    return {"manifest": rules.resize_images.output.manifest}


def rerank_inputs(wildcards):
    """Of evaluate_job: the retrieval model and its features, if it reranks."""
    source = reranker(wildcards.experiment)
    if source is None:
        return {}
    inputs = {
        "retrieval": model_file(source, "retrieval"),
        "retrieval_features": FEATURE_FILES["test"],
    }
    if retrieval_end_to_end(source):
        inputs["retrieval_manifest"] = rules.resize_images.output.manifest
    return inputs


def stage_metrics(wildcards):
    """The per-stage test metrics of an experiment, in stage order."""
    return {
        s: stage_metrics_file(wildcards.experiment, s)
        for s in stages(wildcards.experiment)
    }


def stage_files(pattern):
    """`pattern` ({stage} in it) for each stage of the experiment, in order."""
    return lambda wildcards: [
        f"results/{wildcards.experiment}/{pattern.format(stage=s)}"
        for s in stages(wildcards.experiment)
    ]


def export_inputs(wildcards):
    """Of export_model_job: an experiment's last checkpoint, what its features were made
    of, and its test metrics (and SCST reward) for the provenance."""
    name, last = wildcards.experiment, last_stage(wildcards.experiment)
    inputs = {
        "checkpoint": model_file(name, last),
        "labels_json": rules.prepro_labels.output.labels_json,
        "manifest": rules.resize_images.output.manifest,
        "features": features_of(name, last, "test"),
        "metrics": metrics_file(name),
    }
    if "scst" in stages(name):  # the reward of the last self-critical stage
        tuned = "scst_e2e" if "scst_e2e" in stages(name) else "scst"
        inputs["signature"] = reward_file(name, tuned)
    return inputs


def ensemble_inputs(wildcards):
    """Of evaluate_ensemble_job: each member's last checkpoint and the test features it
    reads, in member order."""
    members = ENSEMBLES[wildcards.ensemble]["members"]
    return {
        "checkpoints": [model_file(m, last_stage(m)) for m in members],
        "features": [features_of(m, last_stage(m), "test") for m in members],
    }


def ensemble_metrics(wildcards):
    """Of report_ensemble_job: the members' last-stage test metrics, then the ensemble's."""
    members = ENSEMBLES[wildcards.ensemble]["members"]
    reports = {
        f"{m}_{last_stage(m)}": stage_metrics_file(m, last_stage(m)) for m in members
    }
    reports["ensemble"] = stage_metrics_file(wildcards.ensemble, "ensemble")
    return reports


def ensemble_bundles(wildcards):
    """Of export_ensemble_job: the members' bundles."""
    return [bundle_file(m) for m in ENSEMBLES[wildcards.ensemble]["members"]]
