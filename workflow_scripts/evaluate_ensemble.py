"""Stage evaluate (rule evaluate_ensemble_job, one job per ensemble): caption the test split with the members decoding together, and score it."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
sys.stdout = sys.stderr

from captionflow.config import build
from captionflow.errors import one_line_errors
from captionflow.evaluation.captioning import DecodingConfig, evaluate_ensemble

with one_line_errors():
    evaluate_ensemble(
        checkpoints=list(snakemake.input.checkpoints),
        features=list(snakemake.input.features),
        labels_h5=snakemake.input.labels_h5,
        labels_json=snakemake.input.labels_json,
        references=snakemake.input.references,
        out_predictions=snakemake.output.predictions,
        out_metrics=snakemake.output.metrics,
        threads=snakemake.threads,
        cfg=build(DecodingConfig, snakemake.params.decoding),
    )
