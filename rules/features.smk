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
        mem_mb=config["features"]["mem_mb"],
        gpu=gpus_for(config["features"]["device"]),
    params:
        features=feature_settings(),
    script:
        "../workflow_scripts/extract_features.py"
