"""Rule prefetch: download SPICE's CoreNLP jars and ImageNet backbone weights."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
sys.stdout = sys.stderr

from captionflow.errors import one_line_errors
from captionflow.prefetch import prefetch

with one_line_errors():
    prefetch(out=snakemake.output[0], backbone=snakemake.params.backbone, weights=snakemake.params.weights)
