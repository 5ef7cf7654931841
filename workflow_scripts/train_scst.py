"""Stage train_scst (rule train_scst_job, one job per experiment): self-critical sequence training from the checkpoint of the experiment's stage before it (e2e, or XE)."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
sys.stdout = sys.stderr

from captionflow.config import build
from captionflow.errors import one_line_errors
from captionflow.training.distributed import launch
from captionflow.training.scst import SCSTConfig, train

with one_line_errors():
    launch(
        train,
        snakemake.params.processes,  # `gpus`: > 1 runs under torchrun
        features_train=snakemake.input.train,
        features_val=snakemake.input.val,
        labels_h5=snakemake.input.labels_h5,
        labels_json=snakemake.input.labels_json,
        references=snakemake.input.references,
        cider_df=snakemake.input.cider_df,
        init_checkpoint=snakemake.input.init,
        out_checkpoint=snakemake.output.checkpoint,
        out_history=snakemake.output.history,
        out_signature=snakemake.output.signature,
        cfg=build(SCSTConfig, snakemake.params.scst),
        threads=snakemake.threads,
    )
