# Training stages: cross-entropy (XE), end-to-end fine-tuning (e2e) with feature
# regeneration, and self-critical sequence training (SCST). Each runs one job per
# experiment (`<stage>_job`); `snakemake <stage>` builds it for every experiment
# (rules/targets.smk).


rule train_xe_job:
    input:
        train=FEATURE_FILES["train"],
        val=FEATURE_FILES["val"],
        labels_h5=rules.prepro_labels.output.labels_h5,
        labels_json=rules.prepro_labels.output.labels_json,
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
    threads: lambda wildcards: EXPERIMENTS[wildcards.experiment]["threads"]
    resources:
        **stage_resources("xe"),
    params:
        model=experiment_setting("model"),
        model_args=experiment_setting("model_args"),
        blind=experiment_setting("blind"),
        xe=stage_settings("xe"),
        processes=stage_processes("xe"),
    script:
        "../workflow_scripts/train_xe.py"


rule finetune_e2e_job:
    input:
        labels_h5=rules.prepro_labels.output.labels_h5,
        labels_json=rules.prepro_labels.output.labels_json,
        references=rules.prepro_labels.output.references,
        manifest=rules.resize_images.output.manifest,
        init="results/{experiment}/xe/model.pt",
    output:
        checkpoint="results/{experiment}/e2e/model.pt",
        backbone="results/{experiment}/e2e/backbone.pth",
        history="results/{experiment}/e2e/history.tsv",
    log:
        "logs/finetune_e2e/{experiment}.log",
    benchmark:
        "benchmarks/finetune_e2e/{experiment}.tsv"
    conda:
        "../envs/captionflow.yaml"
    threads: lambda wildcards: EXPERIMENTS[wildcards.experiment]["threads"]
    resources:
        **stage_resources("e2e"),
    params:
        e2e=stage_settings("e2e"),
        backbone=BACKBONE,
    script:
        "../workflow_scripts/finetune_e2e.py"


rule regenerate_features_job:
    input:
        backbone=rules.finetune_e2e_job.output.backbone,
        labels_json=rules.prepro_labels.output.labels_json,
        manifest=rules.resize_images.output.manifest,
    output:
        **{split: f"results/{{experiment}}/features_e2e/{split}.h5" for split in SPLITS},
    log:
        "logs/regenerate_features/{experiment}.log",
    benchmark:
        "benchmarks/regenerate_features/{experiment}.tsv"
    conda:
        "../envs/captionflow.yaml"
    threads: config["features"]["threads"]
    resources:
        **feature_resources(),
    params:
        backbone=BACKBONE,
        features=extraction_settings("features"),
    script:
        "../workflow_scripts/regenerate_features.py"


rule train_scst_job:
    input:
        train=stage_features("train", "scst"),
        val=stage_features("val", "scst"),
        labels_h5=rules.prepro_labels.output.labels_h5,
        labels_json=rules.prepro_labels.output.labels_json,
        references=rules.prepro_labels.output.references,
        cider_df=rules.prepro_cider_df.output.cider_df,
        init=previous_checkpoint,
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
    threads: lambda wildcards: EXPERIMENTS[wildcards.experiment]["threads"]
    resources:
        **stage_resources("scst"),
    params:
        scst=stage_settings("scst"),
        processes=stage_processes("scst"),
    script:
        "../workflow_scripts/train_scst.py"


rule train_scst_e2e_job:
    input:
        labels_h5=rules.prepro_labels.output.labels_h5,
        labels_json=rules.prepro_labels.output.labels_json,
        references=rules.prepro_labels.output.references,
        cider_df=rules.prepro_cider_df.output.cider_df,
        manifest=rules.resize_images.output.manifest,
        init="results/{experiment}/scst/model.pt",
        backbone=rules.finetune_e2e_job.output.backbone,
    output:
        checkpoint="results/{experiment}/scst_e2e/model.pt",
        backbone="results/{experiment}/scst_e2e/backbone.pth",
        history="results/{experiment}/scst_e2e/history.tsv",
        signature="results/{experiment}/scst_e2e/reward.txt",
    log:
        "logs/train_scst_e2e/{experiment}.log",
    benchmark:
        "benchmarks/train_scst_e2e/{experiment}.tsv"
    conda:
        "../envs/captionflow.yaml"
    threads: lambda wildcards: EXPERIMENTS[wildcards.experiment]["threads"]
    resources:
        **stage_resources("scst_e2e"),
    params:
        scst_e2e=stage_settings("scst_e2e"),
        backbone=BACKBONE,
    script:
        "../workflow_scripts/train_scst_e2e.py"


rule regenerate_scst_e2e_features_job:
    input:
        backbone=rules.train_scst_e2e_job.output.backbone,
        labels_json=rules.prepro_labels.output.labels_json,
        manifest=rules.resize_images.output.manifest,
    output:
        test="results/{experiment}/features_scst_e2e/test.h5",
    log:
        "logs/regenerate_features/{experiment}_scst_e2e.log",
    benchmark:
        "benchmarks/regenerate_features/{experiment}_scst_e2e.tsv"
    conda:
        "../envs/captionflow.yaml"
    threads: config["features"]["threads"]
    resources:
        **feature_resources(),
    params:
        backbone=BACKBONE,
        features=extraction_settings("features"),
    script:
        "../workflow_scripts/regenerate_features.py"


rule train_es_job:
    input:
        unpack(es_init),
        train=stage_features("train", "es"),
        val=stage_features("val", "es"),
        labels_h5=rules.prepro_labels.output.labels_h5,
        labels_json=rules.prepro_labels.output.labels_json,
        references=rules.prepro_labels.output.references,
        cider_df=rules.prepro_cider_df.output.cider_df,
    output:
        checkpoint="results/{experiment}/es/model.pt",
        history="results/{experiment}/es/history.tsv",
    log:
        "logs/train_es/{experiment}.log",
    benchmark:
        "benchmarks/train_es/{experiment}.tsv"
    conda:
        "../envs/captionflow.yaml"
    threads: lambda wildcards: EXPERIMENTS[wildcards.experiment]["threads"]
    resources:
        **stage_resources("es"),
    params:
        es=stage_settings("es"),
        processes=stage_processes("es"),
        model=experiment_setting("model"),
        model_args=experiment_setting("model_args"),
    script:
        "../workflow_scripts/train_es.py"


rule train_retrieval_job:
    input:
        unpack(retrieval_images),
        train=FEATURE_FILES["train"],
        val=FEATURE_FILES["val"],
        labels_h5=rules.prepro_labels.output.labels_h5,
        labels_json=rules.prepro_labels.output.labels_json,
    output:
        checkpoint="results/{experiment}/retrieval/model.pt",
        history="results/{experiment}/retrieval/history.tsv",
    log:
        "logs/train_retrieval/{experiment}.log",
    benchmark:
        "benchmarks/train_retrieval/{experiment}.tsv"
    conda:
        "../envs/captionflow.yaml"
    threads: lambda wildcards: EXPERIMENTS[wildcards.experiment]["threads"]
    resources:
        **stage_resources("retrieval"),
    params:
        retrieval=stage_settings("retrieval"),
        blind=experiment_setting("blind"),
        backbone=BACKBONE,
    script:
        "../workflow_scripts/train_retrieval.py"
