# Data stages: demo dataset -> resized images -> vocabulary and labels.


rule make_demo_dataset:
    output:
        captions="results/demo/dataset_coco.json",
        images=directory("results/demo/images"),
    log:
        "logs/make_demo_dataset.log",
    benchmark:
        "benchmarks/make_demo_dataset.tsv"
    localrule: True
    conda:
        "../envs/captionflow.yaml"
    params:
        splits=config["data"]["demo"]["splits"],
        seed=config["seed"],
        min_side=config["data"]["demo"]["min_side"],
        max_side=config["data"]["demo"]["max_side"],
    script:
        "../workflow_scripts/make_demo_dataset.py"


# data.source cuhk_pedes: its annotation file -> the Karpathy-schema caption file (CAPTIONS).
if CUHK_PEDES:

    rule import_cuhk_pedes:
        input:
            reid_raw=config["data"]["cuhk_pedes_json"],
        output:
            captions="results/data/cuhk_pedes/dataset_coco.json",
        log:
            "logs/import_cuhk_pedes.log",
        localrule: True
        conda:
            "../envs/captionflow.yaml"
        script:
            "../workflow_scripts/import_cuhk_pedes.py"


rule resize_images:
    input:
        unpack(resize_inputs),
    output:
        manifest="results/data/resize_manifest.json",
        skipped="results/data/resize_skipped.tsv",
    log:
        "logs/resize_images.log",
    benchmark:
        "benchmarks/resize_images.tsv"
    conda:
        "../envs/captionflow.yaml"
    threads: config["resize"]["threads"]
    resources:
        mem_mb=lambda wildcards, attempt: 2000 * attempt,
    params:
        images_root=IMAGES_ROOT,
        image_base_dir="results/data/resized",
        size=config["resize"]["size"],
        mode=config["resize"]["mode"],
        quality=config["resize"]["quality"],
        on_bad_image=config["resize"]["on_bad_image"],
        max_pixels=config["resize"]["max_pixels"],
        allow_outside_root=config["data"]["allow_outside_root"],
        sources=resize_sources,
    script:
        "../workflow_scripts/resize_images.py"


rule prepro_labels:
    input:
        captions=CAPTIONS,
        skipped=rules.resize_images.output.skipped,
    output:
        labels_h5="results/data/labels.h5",
        labels_json="results/data/labels.json",
        references="results/data/references.json",
    log:
        "logs/prepro_labels.log",
    benchmark:
        "benchmarks/prepro_labels.tsv"
    conda:
        "../envs/captionflow.yaml"
    resources:
        mem_mb=lambda wildcards, attempt: 4000 * attempt,
    params:
        max_len=config["labels"]["max_len"],
        word_count_threshold=config["labels"]["word_count_threshold"],
        restval_to_train=config["labels"]["restval_to_train"],
    script:
        "../workflow_scripts/prepro_labels.py"


rule prepro_cider_df:
    input:
        labels_h5=rules.prepro_labels.output.labels_h5,
        labels_json=rules.prepro_labels.output.labels_json,
    output:
        cider_df="results/data/cider_df_train.npz",
    log:
        "logs/prepro_cider_df.log",
    benchmark:
        "benchmarks/prepro_cider_df.tsv"
    conda:
        "../envs/captionflow.yaml"
    resources:
        mem_mb=lambda wildcards, attempt: 4000 * attempt,
    params:
        # the end token counted (scst.eos_mode standard); a param, so that a file written
        # without it (before issue 27) is rebuilt by the next run (rerun trigger: params)
        end_token=True,
    script:
        "../workflow_scripts/prepro_cider_df.py"
