"""Rule extract_features: resized images -> grid features, one HDF5 per split."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
sys.stdout = sys.stderr

from captionflow.config import build
from captionflow.errors import one_line_errors
from captionflow.features.backbones import Backbone
from captionflow.features.extract import FeatureConfig, extract_features

with one_line_errors():
    extract_features(
        labels_json=snakemake.input.labels_json,
        manifest=snakemake.input.manifest,
        outputs=dict(snakemake.output.items()),
        backbone=Backbone(**snakemake.params.backbone),
        cfg=build(FeatureConfig, snakemake.params.features),
        threads=snakemake.threads,
    )
