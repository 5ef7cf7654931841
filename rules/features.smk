# Feature extraction: resized images -> one HDF5 of grid features per split.


rule extract_features:
    input:
        index=rules.prepro_labels.output.index,
        manifest=rules.resize_images.output.manifest,
    output:
        **FEATURE_FILES,
    log:
        "logs/extract_features.log",
    benchmark:
        "benchmarks/extract_features.tsv"
    conda:
        "../envs/captionflow.yaml"
    threads: config["features"]["threads"]
    resources:
        **feature_resources(),
    params:
        features=feature_settings(),
    script:
        "../workflow_scripts/extract_features.py"
