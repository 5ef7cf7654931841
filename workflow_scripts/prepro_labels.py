"""Rule prepro_labels: captions -> vocabulary, labels HDF5 and image index JSON."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
sys.stdout = sys.stderr

from captionflow.data.labels import prepro_labels
from captionflow.errors import one_line_errors

with one_line_errors():
    prepro_labels(
        captions=snakemake.input.captions,
        skipped=snakemake.input.skipped,
        out_h5=snakemake.output.labels,
        out_json=snakemake.output.index,
        out_refs=snakemake.output.references,
        max_length=snakemake.params.max_length,
        word_count_threshold=snakemake.params.word_count_threshold,
        restval_to_train=snakemake.params.restval_to_train,
    )
