"""Rule plot_attention (one job per attention experiment): word-by-word attention maps of its last stage on the first gallery images."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
sys.stdout = sys.stderr

from captionflow.errors import one_line_errors
from captionflow.report.attention import attention_maps

with one_line_errors():
    attention_maps(
        checkpoint_path=snakemake.input.checkpoint,
        features=snakemake.input.features,
        labels_h5=snakemake.input.labels_h5,
        labels_json=snakemake.input.labels_json,
        manifest=snakemake.input.manifest,
        out_dir=snakemake.output.maps,
        images=snakemake.params.images,
        max_len=snakemake.params.max_len,
        threads=snakemake.threads,
    )
