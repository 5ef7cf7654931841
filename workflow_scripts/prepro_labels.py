"""Rule prepro_labels: captions -> vocabulary, labels HDF5, labels JSON and references JSON."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
sys.stdout = sys.stderr

from captionflow.data.labels import prepro_labels
from captionflow.errors import one_line_errors

with one_line_errors():
    prepro_labels(
        captions=snakemake.input.captions,
        skipped=snakemake.input.skipped,
        out_labels_h5=snakemake.output.labels_h5,
        out_labels_json=snakemake.output.labels_json,
        out_references=snakemake.output.references,
        max_len=snakemake.params.max_len,
        word_count_threshold=snakemake.params.word_count_threshold,
        restval_to_train=snakemake.params.restval_to_train,
    )
