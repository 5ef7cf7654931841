"""Stage finetune_e2e (rule finetune_e2e_job, one job per experiment): backbone and captioner trained jointly from the resized images."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
sys.stdout = sys.stderr

from captionflow.config import build
from captionflow.errors import one_line_errors
from captionflow.features.backbones import Backbone
from captionflow.training.e2e import E2EConfig, train

with one_line_errors():
    train(
        labels_h5=snakemake.input.labels_h5,
        labels_json=snakemake.input.labels_json,
        references=snakemake.input.references,
        manifest=snakemake.input.manifest,
        init_checkpoint=snakemake.input.init,
        out_checkpoint=snakemake.output.checkpoint,
        out_backbone=snakemake.output.backbone,
        out_history=snakemake.output.history,
        backbone=Backbone(**snakemake.params.backbone),
        cfg=build(E2EConfig, snakemake.params.e2e),
        threads=snakemake.threads,
    )
