"""Rule prefetch_spice: SPICE's Stanford CoreNLP jars into pycocoevalcap (needs internet)."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from captionflow.errors import one_line_errors
from captionflow.prefetch import prefetch_spice

with one_line_errors():
    prefetch_spice(out=snakemake.output[0])
