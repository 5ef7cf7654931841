"""Stage evaluate_retrieval (rule evaluate_retrieval_job, one job per experiment with `retrieval:`): text-to-image and image-to-text R@1/5/10 and mAP on the test split."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
sys.stdout = sys.stderr

from captionflow.errors import one_line_errors
from captionflow.evaluation.retrieval import evaluate_retrieval

with one_line_errors():
    evaluate_retrieval(
        checkpoint_path=snakemake.input.checkpoint,
        features=snakemake.input.features,
        labels_h5=snakemake.input.labels_h5,
        labels_json=snakemake.input.labels_json,
        out_metrics=snakemake.output.metrics,
        manifest=snakemake.input.get("manifest"),
    )
