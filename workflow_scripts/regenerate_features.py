"""Rule regenerate_features: extract_features again, with each experiment's fine-tuned backbone."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
sys.stdout = sys.stderr

from captionflow.errors import one_line_errors
from captionflow.features.extract import FeatureConfig, extract_features

with one_line_errors():
    # input.backbones is in the order of params.outputs' experiments
    for (experiment, outputs), backbone in zip(snakemake.params.outputs.items(), snakemake.input.backbones):
        print(f"{experiment}: features from {backbone}", flush=True)
        extract_features(
            labels_json=snakemake.input.index,
            manifest=snakemake.input.manifest,
            outputs=outputs,
            cfg=FeatureConfig(**{**snakemake.params.features, "weights": backbone}),
            threads=snakemake.threads,
        )
