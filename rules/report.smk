# The report: figures and pages tagged for `snakemake --report report.html`, under the
# categories below. The workflow description is report/workflow.rst (the Snakefile's
# `report:`); each item's caption is report/<item>.rst. What goes in: ATTENTION_EXPERIMENTS
# and BLIND_TWINS (rules/common/config_values.smk), the files (rules/common/paths.smk).
# The per-experiment plots run as `<stage>_job`, like the other stages (targets.smk).


rule plot_experiment_job:
    input:
        histories=stage_files("{stage}/history.tsv"),
        predictions=stage_files("test/{stage}/predictions.json"),
        references=rules.prepro_labels.output.references,
        labels_json=rules.prepro_labels.output.labels_json,
        manifest=rules.resize_images.output.manifest,
    output:
        curves=report(
            directory("results/{experiment}/report/curves"),
            patterns=["{figure}.png"],
            caption="../report/curves.rst",
            category="Learning curves",
            subcategory="{experiment}",
            labels={"experiment": "{experiment}", "figure": "{figure}"},
        ),
        gallery=report(
            "results/{experiment}/report/gallery.html",
            caption="../report/gallery.rst",
            category="Caption gallery",
            labels={"experiment": "{experiment}"},
        ),
    log:
        "logs/plot_experiment/{experiment}.log",
    benchmark:
        "benchmarks/plot_experiment/{experiment}.tsv"
    localrule: True
    conda:
        "../envs/captionflow.yaml"
    params:
        stages=lambda wildcards: stages(wildcards.experiment),
        gallery_images=REPORT["gallery_images"],
    script:
        "../workflow_scripts/plot_experiment.py"


rule plot_attention_job:
    input:
        checkpoint=lambda wildcards: f"results/{wildcards.experiment}/{last_stage(wildcards.experiment)}/model.pt",
        features=lambda wildcards: features_of(
            wildcards.experiment, last_stage(wildcards.experiment), "test"
        ),
        labels_h5=rules.prepro_labels.output.labels_h5,
        labels_json=rules.prepro_labels.output.labels_json,
        manifest=rules.resize_images.output.manifest,
    output:
        maps=report(
            directory("results/{experiment}/report/attention"),
            patterns=["{image}.png"],
            caption="../report/attention.rst",
            category="Attention maps",
            subcategory="{experiment}",
            labels={"experiment": "{experiment}", "test image": "{image}"},
        ),
    log:
        "logs/plot_attention/{experiment}.log",
    benchmark:
        "benchmarks/plot_attention/{experiment}.tsv"
    localrule: True
    conda:
        "../envs/captionflow.yaml"
    params:
        images=REPORT["attention_images"],
        max_len=lambda wildcards: EXPERIMENTS[wildcards.experiment]["evaluate"][
            "max_len"
        ],
    script:
        "../workflow_scripts/plot_attention.py"


rule report_tables:
    input:
        metrics=[path for stages in TABLE_METRICS.values() for path in stages.values()],
        retrieval=RETRIEVAL_METRICS,
        # the rest of the run, so that the benchmark table has all of its jobs
        run=[
            *FEATURE_FILES.values(),
            *EXPORT_FILES,
            *FIGURE_FILES,
        ],
    output:
        metrics=report(
            "results/report/metrics.html",
            caption="../report/metrics.rst",
            category="Metrics",
        ),
        table="results/report/metrics.tsv",
        benchmarks=report(
            "results/report/benchmarks.html",
            caption="../report/benchmarks.rst",
            category="Run time and memory",
        ),
    log:
        "logs/report_tables/all.log",
    localrule: True
    conda:
        "../envs/captionflow.yaml"
    params:
        experiments=TABLE_METRICS,
        blind_twins=BLIND_TWINS,
        retrieval=RETRIEVAL_TABLE,
        benchmarks="benchmarks",
    script:
        "../workflow_scripts/report_tables.py"
