# The stages, in one place: the training stages by their config name, and every stage
# target (`snakemake <target>`, rules/targets.smk) with its per-experiment job rules and
# the files those build. A new stage adds its line here and its rules in a stage family.

# A training stage's config name (experiments.<name>.stages) -> its stage target.
TRAINING_STAGES = {
    "xe": "train_xe",
    "e2e": "finetune_e2e",
    "scst": "train_scst",
    "scst_e2e": "train_scst_e2e",
    "es": "train_es",
}


wildcard_constraints:
    stage="|".join(TRAINING_STAGES),


def stage_models(stage):
    """The checkpoints of `stage` of every experiment that has it."""
    return [model_file(name, stage) for name in experiments_with(stage)]


# Stage target -> (its job rules: one job per experiment or ensemble, its jobs' outputs).
STAGE_TARGETS = {
    "train_xe": (["train_xe_job"], stage_models("xe")),
    "finetune_e2e": (["finetune_e2e_job"], stage_models("e2e")),
    "regenerate_features": (
        ["regenerate_features_job", "regenerate_scst_e2e_features_job"],
        [
            f
            for features in (E2E_FEATURES, SCST_E2E_FEATURES)
            for e in features
            for f in features[e].values()
        ],
    ),
    "train_scst": (["train_scst_job"], stage_models("scst")),
    "train_scst_e2e": (["train_scst_e2e_job"], stage_models("scst_e2e")),
    "train_es": (["train_es_job"], stage_models("es")),
    "train_retrieval": (["train_retrieval_job"], RETRIEVAL_MODELS),
    "evaluate_retrieval": (["evaluate_retrieval_job"], RETRIEVAL_METRICS),
    "evaluate": (
        ["evaluate_job", "evaluate_ensemble_job"],
        [stage_metrics_file(e, s) for e in EXPERIMENTS for s in stages(e)]
        + [stage_metrics_file(e, "ensemble") for e in ENSEMBLES],
    ),
    "report_metrics": (
        ["report_metrics_job", "report_ensemble_job"],
        METRICS_FILES + ENSEMBLE_METRICS,
    ),
    "export_model": (["export_model_job", "export_ensemble_job"], EXPORT_FILES),
    "export_onnx": (["export_onnx_job"], ONNX_DIRS),
    "plot_experiment": (["plot_experiment_job"], EXPERIMENT_FIGURES),
    "plot_attention": (["plot_attention_job"], ATTENTION_MAPS),
}


def stage_outputs(target):
    """Input function of a stage target: its jobs' outputs for every experiment that has
    the stage; a target no experiment has stops the run in one line."""

    def outputs(wildcards):
        jobs, files = STAGE_TARGETS[target]
        if not files:
            raise WorkflowError(
                f"nothing to build for {target}: no experiment in the config has that "
                "stage (experiments.<name>.stages)"
            )
        force_jobs_of_forced_target(target, jobs)
        return files

    return outputs


def force_jobs_of_forced_target(target, jobs):
    """`-R <target>` reruns the target's job rules too (`-R train_scst`: every
    train_scst_job).

    A stage target has no outputs of its own, and Snakemake forces nothing upstream of a
    forced rule, so without this `-R <stage>` would rerun nothing. Snakemake has no public
    way to say "forcing this rule forces those", so this reaches into its internals (as of
    Snakemake 9): the rules given to `-R` are `workflow.dag_settings.forcerun` (names), the
    rules the DAG treats as forced are the set `workflow.dag.forcerules`. Input functions
    are evaluated while the DAG is built, before Snakemake decides what must run, so adding
    the job rules here is in time. tests/workflow/test_stage_targets.py checks it.
    """
    if target in workflow.dag_settings.forcerun:
        for job in jobs:
            workflow.dag.forcerules.add(workflow.get_rule(job))
