# Downloads for offline compute nodes. On a machine with internet, in the run's working
# directory (so that it reads the run's config):
#   snakemake -s <captionflow>/Snakefile --directory <run> --cores 1 prefetch
# One local job per download this config needs (`-n` lists them): SPICE's jars when
# anything is evaluated, the backbone's pretrained weights when features.weights is
# imagenet (or coco for the detector): PREFETCH_REPORTS (rules/common/paths.smk). Nothing
# else in the workflow downloads.


rule prefetch:
    input:
        PREFETCH_REPORTS,
    output:
        "results/prefetch.json",
    log:
        "logs/prefetch.log",
    localrule: True
    conda:
        "../envs/captionflow.yaml"
    script:
        "../workflow_scripts/prefetch.py"


rule prefetch_spice:
    output:
        f"{PREFETCH_DIR}/spice.json",
    log:
        "logs/prefetch/spice.log",
    localrule: True
    conda:
        "../envs/captionflow.yaml"
    script:
        "../workflow_scripts/prefetch_spice.py"


rule prefetch_weights:
    output:
        f"{PREFETCH_DIR}/weights/{{backbone}}.json",
    log:
        "logs/prefetch/weights_{backbone}.log",
    localrule: True
    conda:
        "../envs/captionflow.yaml"
    params:
        weights=config["features"]["weights"],
    script:
        "../workflow_scripts/prefetch_weights.py"
