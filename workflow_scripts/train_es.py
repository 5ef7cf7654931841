"""Stage train_es (rule train_es_job, one job per experiment): evolution strategies (NIC-NES / NIC-ES) from the experiment's XE checkpoint, or from a random init."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
sys.stdout = sys.stderr

from captionflow.config import build
from captionflow.errors import one_line_errors
from captionflow.training.distributed import launch
from captionflow.training.es import ESConfig, train

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
        init_checkpoint=snakemake.input.get("init"),
        model_name=snakemake.params.model,
        model_args=snakemake.params.model_args,
        out_checkpoint=snakemake.output.checkpoint,
        out_history=snakemake.output.history,
        cfg=build(ESConfig, snakemake.params.es),
        threads=snakemake.threads,
    )
