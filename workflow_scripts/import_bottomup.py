"""Rule import_bottomup: Anderson et al.'s bottom-up TSV release -> region features, one HDF5 per split."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
sys.stdout = sys.stderr

from captionflow.errors import one_line_errors
from captionflow.features.bottomup import import_bottomup

with one_line_errors():
    import_bottomup(
        tsv_paths=list(snakemake.input.tsv),
        labels_json=snakemake.input.labels_json,
        outputs={k: v for k, v in snakemake.output.items()},
        max_boxes=snakemake.params.max_boxes,
        dtype=snakemake.params.dtype,
    )
