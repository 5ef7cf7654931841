"""Stage regenerate_features (rule regenerate_features_job, one job per experiment): extract_features again, with one experiment's fine-tuned backbone."""

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
        backbone=Backbone(**{**snakemake.params.backbone, "weights": snakemake.input.backbone}),
        cfg=build(FeatureConfig, snakemake.params.features),
        threads=snakemake.threads,
    )
