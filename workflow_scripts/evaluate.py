"""Stage evaluate (rule evaluate_job, one job per experiment and stage): caption the test split and score it with pycocoevalcap."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
sys.stdout = sys.stderr

from captionflow.config import build
from captionflow.errors import one_line_errors
from captionflow.evaluation.captioning import DecodingConfig, evaluate

with one_line_errors():
    evaluate(
        checkpoint_path=snakemake.input.checkpoint,
        features=snakemake.input.features,
        labels_h5=snakemake.input.labels_h5,
        labels_json=snakemake.input.labels_json,
        references=snakemake.input.references,
        out_predictions=snakemake.output.predictions,
        out_metrics=snakemake.output.metrics,
        threads=snakemake.threads,
        cfg=build(DecodingConfig, snakemake.params.decoding),
        retrieval=snakemake.input.get("retrieval"),
        retrieval_features=snakemake.input.get("retrieval_features"),
        retrieval_manifest=snakemake.input.get("retrieval_manifest"),
    )
