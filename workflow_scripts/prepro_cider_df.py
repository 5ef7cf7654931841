"""Rule prepro_cider_df: CIDEr-D document frequencies of the training references (SCST reward)."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
sys.stdout = sys.stderr

from captionflow.errors import one_line_errors
from captionflow.metrics.cider import write_training_df

with one_line_errors():
    write_training_df(
        labels_h5=snakemake.input.labels_h5,
        labels_json=snakemake.input.labels_json,
        out=snakemake.output.cider_df,
        end_token=snakemake.params.end_token,
    )
