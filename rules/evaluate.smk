# Evaluation: decode the test split and score it with pycocoevalcap (Java: checked at
# workflow start, rules/common/preflight.smk); the retrieval models' test evaluation.


rule evaluate_job:
    input:
        unpack(rerank_inputs),
        checkpoint="results/{experiment}/{stage}/model.pt",
        features=stage_features("test"),
        labels_h5=rules.prepro_labels.output.labels_h5,
        labels_json=rules.prepro_labels.output.labels_json,
        references=rules.prepro_labels.output.references,
    output:
        predictions="results/{experiment}/test/{stage}/predictions.json",
        metrics="results/{experiment}/test/{stage}/metrics.json",
    log:
        "logs/evaluate/{experiment}_{stage}.log",
    benchmark:
        "benchmarks/evaluate/{experiment}_{stage}.tsv"
    conda:
        "../envs/captionflow.yaml"
    threads: lambda wildcards: EXPERIMENTS[wildcards.experiment]["threads"]
    resources:
        **stage_resources("evaluate"),
    params:
        decoding=stage_settings("evaluate"),
    script:
        "../workflow_scripts/evaluate.py"


rule report_metrics_job:
    input:
        unpack(stage_metrics),
    output:
        json="results/{experiment}/test/metrics.json",
        table="results/{experiment}/test/metrics.tsv",
    log:
        "logs/report_metrics/{experiment}.log",
    localrule: True
    conda:
        "../envs/captionflow.yaml"
    script:
        "../workflow_scripts/report_metrics.py"


rule evaluate_retrieval_job:
    input:
        unpack(retrieval_images),
        checkpoint="results/{experiment}/retrieval/model.pt",
        features=FEATURE_FILES["test"],
        labels_h5=rules.prepro_labels.output.labels_h5,
        labels_json=rules.prepro_labels.output.labels_json,
    output:
        metrics="results/{experiment}/test/retrieval/metrics.json",
    log:
        "logs/evaluate_retrieval/{experiment}.log",
    benchmark:
        "benchmarks/evaluate_retrieval/{experiment}.tsv"
    conda:
        "../envs/captionflow.yaml"
    resources:
        mem_mb=job_memory,
    script:
        "../workflow_scripts/evaluate_retrieval.py"
