# Ensembles (config `ensembles`): experiments of this config decoding together. Each
# ensemble is evaluated on the test split, reported beside its members' last stages, and
# exported as one bundle of its members'.


rule evaluate_ensemble_job:
    input:
        unpack(ensemble_inputs),
        labels_h5=rules.prepro_labels.output.labels_h5,
        labels_json=rules.prepro_labels.output.labels_json,
        references=rules.prepro_labels.output.references,
    output:
        predictions="results/{ensemble}/test/ensemble/predictions.json",
        metrics="results/{ensemble}/test/ensemble/metrics.json",
    log:
        "logs/evaluate/{ensemble}_ensemble.log",
    benchmark:
        "benchmarks/evaluate/{ensemble}_ensemble.tsv"
    conda:
        "../envs/captionflow.yaml"
    threads: lambda wildcards: ENSEMBLES[wildcards.ensemble]["threads"]
    resources:
        **ensemble_resources(),
    params:
        decoding=decoding_settings,
    script:
        "../workflow_scripts/evaluate_ensemble.py"


rule report_ensemble_job:
    input:
        unpack(ensemble_metrics),
    output:
        json="results/{ensemble}/test/metrics.json",
        table="results/{ensemble}/test/metrics.tsv",
    log:
        "logs/report_metrics/{ensemble}.log",
    localrule: True
    conda:
        "../envs/captionflow.yaml"
    script:
        "../workflow_scripts/report_metrics.py"


rule export_ensemble_job:
    input:
        members=ensemble_bundles,
        metrics="results/{ensemble}/test/metrics.json",
    output:
        bundle="results/{ensemble}/export/bundle.pt",
        card="results/{ensemble}/export/bundle.json",
    log:
        "logs/export_model/{ensemble}.log",
    benchmark:
        "benchmarks/export_model/{ensemble}.tsv"
    conda:
        "../envs/captionflow.yaml"
    resources:
        mem_mb=lambda wildcards, attempt: 4000 * attempt,
    params:
        decoding=decoding_settings,
        config_sha256=CONFIG_SHA256,
    script:
        "../workflow_scripts/export_ensemble.py"
