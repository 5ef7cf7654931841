# Image features, one HDF5 per split, from one of three sources (features.backbone):
#   a torchvision/timm backbone   -> rule extract_features (grid features)
#   bottomup_tsv                  -> rule import_bottomup (Anderson et al.'s TSV release)
#   fasterrcnn_resnet50_fpn       -> rule extract_regions (torchvision Faster R-CNN boxes)


if FEATURE_SOURCE == "bottomup_tsv":

    rule import_bottomup:
        input:
            tsv=config["features"]["tsv"],
            labels_json=rules.prepro_labels.output.labels_json,
        output:
            **FEATURE_FILES,
        log:
            "logs/import_bottomup.log",
        benchmark:
            "benchmarks/import_bottomup.tsv"
        conda:
            "../envs/captionflow.yaml"
        resources:
            mem_mb=lambda wildcards, attempt: 4000 * attempt,
        params:
            max_boxes=config["features"]["max_boxes"],
            dtype=config["features"]["dtype"],
        script:
            "../workflow_scripts/import_bottomup.py"

elif FEATURE_SOURCE == "fasterrcnn_resnet50_fpn":

    rule extract_regions:
        input:
            labels_json=rules.prepro_labels.output.labels_json,
            manifest=rules.resize_images.output.manifest,
        output:
            **FEATURE_FILES,
        log:
            "logs/extract_regions.log",
        benchmark:
            "benchmarks/extract_regions.tsv"
        conda:
            "../envs/captionflow.yaml"
        threads: config["features"]["threads"]
        resources:
            **feature_resources(),
        params:
            regions=extraction_settings("regions"),
        script:
            "../workflow_scripts/extract_regions.py"

else:

    rule extract_features:
        input:
            labels_json=rules.prepro_labels.output.labels_json,
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
            backbone=BACKBONE,
            features=extraction_settings("features"),
        script:
            "../workflow_scripts/extract_features.py"
