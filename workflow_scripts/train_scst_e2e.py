"""Stage train_scst_e2e (rule train_scst_e2e_job, one job per experiment with that stage): SCST with the backbone unfrozen, from the resized images."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
sys.stdout = sys.stderr

from captionflow.config import build
from captionflow.errors import one_line_errors
from captionflow.features.backbones import Backbone
from captionflow.training.scst_e2e import SCSTE2EConfig, train

with one_line_errors():
    train(
        labels_h5=snakemake.input.labels_h5,
        labels_json=snakemake.input.labels_json,
        references=snakemake.input.references,
        cider_df=snakemake.input.cider_df,
        manifest=snakemake.input.manifest,
        init_checkpoint=snakemake.input.init,
        init_backbone=snakemake.input.backbone,
        out_checkpoint=snakemake.output.checkpoint,
        out_backbone=snakemake.output.backbone,
        out_history=snakemake.output.history,
        out_signature=snakemake.output.signature,
        backbone=Backbone(**snakemake.params.backbone),
        cfg=build(SCSTE2EConfig, snakemake.params.scst_e2e),
        threads=snakemake.threads,
    )
