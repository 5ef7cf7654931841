# Training stages: cross-entropy (XE), then self-critical sequence training (SCST).


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


rule train_scst:
    input:
        train=FEATURE_FILES["train"],
        val=FEATURE_FILES["val"],
        labels=rules.prepro_labels.output.labels,
        index=rules.prepro_labels.output.index,
        references=rules.prepro_labels.output.references,
        cider_df=rules.prepro_cider_df.output.df,
        init=rules.train_xe.output.checkpoint,
    output:
        checkpoint="results/{experiment}/scst/model.pt",
        history="results/{experiment}/scst/history.tsv",
        signature="results/{experiment}/scst/reward.txt",
    log:
        "logs/train_scst/{experiment}.log",
    benchmark:
        "benchmarks/train_scst/{experiment}.tsv"
    conda:
        "../envs/captionflow.yaml"
    threads: lambda wildcards: EXPERIMENTS[wildcards.experiment].get("threads", 2)
    resources:
        mem_mb=lambda wildcards: EXPERIMENTS[wildcards.experiment].get("mem_mb", 8000),
        gpu=lambda wildcards: gpus_for(
            EXPERIMENTS[wildcards.experiment].get("scst", {}).get("device", "auto")
        ),
    params:
        scst=experiment_setting("scst", {}),
    script:
        "../workflow_scripts/train_scst.py"
