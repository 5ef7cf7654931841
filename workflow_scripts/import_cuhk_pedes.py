"""Rule import_cuhk_pedes (data.source cuhk_pedes): CUHK-PEDES reid_raw.json -> a Karpathy-schema caption file with each image's person identity."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
sys.stdout = sys.stderr

from captionflow.data.cuhk_pedes import import_cuhk_pedes
from captionflow.errors import one_line_errors

with one_line_errors():
    counts = import_cuhk_pedes(snakemake.input.reid_raw, snakemake.output.captions)
    print(
        f"{counts['images']} images, {counts['sentences']} captions, {counts['identities']} identities; splits {counts['splits']}",
        flush=True,
    )
