"""Rule plot_experiment (one job per experiment): its learning curves and caption gallery for the report."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
sys.stdout = sys.stderr

from captionflow.errors import one_line_errors
from captionflow.report.curves import plot_curves
from captionflow.report.gallery import write_gallery

stages = snakemake.params.stages
with one_line_errors():
    plot_curves(
        experiment=snakemake.wildcards.experiment,
        stage_histories=dict(zip(stages, snakemake.input.histories)),
        out_dir=snakemake.output.curves,
    )
    write_gallery(
        experiment=snakemake.wildcards.experiment,
        stage_predictions=dict(zip(stages, snakemake.input.predictions)),
        references=snakemake.input.references,
        labels_json=snakemake.input.labels_json,
        manifest=snakemake.input.manifest,
        out_html=snakemake.output.gallery,
        images=snakemake.params.gallery_images,
    )
