# Downloads for offline compute nodes: run `snakemake prefetch` where there is internet.


rule prefetch:
    output:
        "results/prefetch.json",
    log:
        "logs/prefetch.log",
    localrule: True
    conda:
        "../envs/captionflow.yaml"
    params:
        backbone=config["features"]["backbone"],
        weights=config["features"]["weights"],
    script:
        "../workflow_scripts/prefetch.py"
