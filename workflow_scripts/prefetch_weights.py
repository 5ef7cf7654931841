"""Rule prefetch_weights: a backbone's pretrained weights into the torch or Hugging Face hub cache (needs internet)."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from captionflow.errors import one_line_errors
from captionflow.prefetch import prefetch_weights

with one_line_errors():
    prefetch_weights(out=snakemake.output[0], backbone=snakemake.wildcards.backbone, weights=snakemake.params.weights)
