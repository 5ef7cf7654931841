# Training stages: cross-entropy (XE) on the extracted features.


rule train_xe:
    input:
        train=FEATURE_FILES["train"],
        val=FEATURE_FILES["val"],
        labels=rules.prepro_labels.output.labels,
        index=rules.prepro_labels.output.index,
        references=rules.prepro_labels.output.references,
    output:
        checkpoint="results/{experiment}/xe/model.pt",
        history="results/{experiment}/xe/history.tsv",
    log:
        "logs/train_xe/{experiment}.log",
    benchmark:
        "benchmarks/train_xe/{experiment}.tsv"
    conda:
        "../envs/captionflow.yaml"
    threads: lambda wildcards: EXPERIMENTS[wildcards.experiment].get("threads", 2)
    resources:
        mem_mb=lambda wildcards: EXPERIMENTS[wildcards.experiment].get("mem_mb", 8000),
        gpu=lambda wildcards: gpus_for(
            EXPERIMENTS[wildcards.experiment].get("xe", {}).get("device", "auto")
        ),
    params:
        model=experiment_setting("model"),
        model_args=experiment_setting("model_args", {}),
        blind=experiment_setting("blind", False),
        xe=experiment_setting("xe", {}),
    script:
        "../workflow_scripts/train_xe.py"
