# Exports: each experiment as a self-contained bundle that `captionflow caption` and
# `captionflow.load` read (an ensemble's bundle: ensemble.smk); ONNX graphs of a bundle
# on request.


rule export_model_job:
    input:
        unpack(export_inputs),
    output:
        bundle="results/{experiment}/export/bundle.pt",
        card="results/{experiment}/export/bundle.json",
    log:
        "logs/export_model/{experiment}.log",
    benchmark:
        "benchmarks/export_model/{experiment}.tsv"
    conda:
        "../envs/captionflow.yaml"
    resources:
        mem_mb=lambda wildcards, attempt: 4000 * attempt,
    params:
        decoding=decoding_settings,
        stages=experiment_setting("stages"),
        seed=config["seed"],
        config_sha256=CONFIG_SHA256,
    script:
        "../workflow_scripts/export_model.py"


rule export_onnx_job:
    input:
        bundle="results/{name}/export/bundle.pt",
    output:
        directory("results/{name}/export/onnx"),
    log:
        "logs/export_onnx/{name}.log",
    benchmark:
        "benchmarks/export_onnx/{name}.tsv"
    conda:
        "../envs/captionflow.yaml"
    resources:
        mem_mb=lambda wildcards, attempt: 8000 * attempt,
    script:
        "../workflow_scripts/export_onnx.py"
