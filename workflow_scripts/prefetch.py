"""Rule prefetch: every download this config needs, listed in one file (the jobs: prefetch_*)."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)

from captionflow.errors import one_line_errors
from captionflow.prefetch import summarise

with one_line_errors():
    summarise(reports=list(snakemake.input), out=snakemake.output[0])
