# Evaluation: decode the test split and score it with pycocoevalcap.


onstart:
    java_preflight()


rule evaluate:
    input:
        checkpoint=rules.train_xe.output.checkpoint,
        features=FEATURE_FILES["test"],
        labels=rules.prepro_labels.output.labels,
        index=rules.prepro_labels.output.index,
        references=rules.prepro_labels.output.references,
    output:
        predictions="results/{experiment}/test/predictions.json",
        metrics="results/{experiment}/test/metrics.json",
    log:
        "logs/evaluate/{experiment}.log",
    benchmark:
        "benchmarks/evaluate/{experiment}.tsv"
    conda:
        "../envs/captionflow.yaml"
    threads: lambda wildcards: EXPERIMENTS[wildcards.experiment].get("threads", 2)
    resources:
        mem_mb=lambda wildcards: EXPERIMENTS[wildcards.experiment].get("mem_mb", 8000),
        gpu=lambda wildcards: gpus_for(
            EXPERIMENTS[wildcards.experiment].get("evaluate", {}).get("device", "auto")
        ),
    params:
        decoding=experiment_setting("evaluate", {}),
    script:
        "../workflow_scripts/evaluate.py"
