"""Stage train_retrieval (rule train_retrieval_job, one job per experiment with `retrieval:`): an image-text retrieval model on the frozen features, the backbone fine-tuned after N steps when asked."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
sys.stdout = sys.stderr

from captionflow.config import build
from captionflow.errors import one_line_errors
from captionflow.features.backbones import Backbone
from captionflow.training.retrieval import RetrievalConfig, train

with one_line_errors():
    train(
        features_train=snakemake.input.train,
        features_val=snakemake.input.val,
        labels_h5=snakemake.input.labels_h5,
        labels_json=snakemake.input.labels_json,
        out_checkpoint=snakemake.output.checkpoint,
        out_history=snakemake.output.history,
        cfg=build(RetrievalConfig, snakemake.params.retrieval),
        blind=snakemake.params.blind,
        threads=snakemake.threads,
        manifest=snakemake.input.get("manifest"),
        backbone=Backbone(**snakemake.params.backbone),
    )
