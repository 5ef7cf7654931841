"""Rule extract_regions: resized images -> torchvision Faster R-CNN region features, one HDF5 per split."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
sys.stdout = sys.stderr

from captionflow.config import build
from captionflow.errors import one_line_errors
from captionflow.features.regions import RegionConfig, extract_regions

with one_line_errors():
    extract_regions(
        labels_json=snakemake.input.labels_json,
        manifest=snakemake.input.manifest,
        outputs={k: v for k, v in snakemake.output.items()},
        cfg=build(RegionConfig, snakemake.params.regions),
        threads=snakemake.threads,
    )
