"""Stage train_xe (rule train_xe_job, one job per experiment): cross-entropy training of one experiment's captioner."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
sys.stdout = sys.stderr

from captionflow.config import build
from captionflow.errors import one_line_errors
from captionflow.training.distributed import launch
from captionflow.training.xe import XEConfig, train

with one_line_errors():
    launch(
        train,
        snakemake.params.processes,  # `gpus`: > 1 runs under torchrun
        features_train=snakemake.input.train,
        features_val=snakemake.input.val,
        labels_h5=snakemake.input.labels_h5,
        labels_json=snakemake.input.labels_json,
        references=snakemake.input.references,
        out_checkpoint=snakemake.output.checkpoint,
        out_history=snakemake.output.history,
        model_name=snakemake.params.model,
        model_args=snakemake.params.model_args,
        cfg=build(XEConfig, snakemake.params.xe),
        blind=snakemake.params.blind,
        threads=snakemake.threads,
    )
