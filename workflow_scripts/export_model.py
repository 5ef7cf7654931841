"""Stage export_model (rule export_model_job, one job per experiment): the experiment's last checkpoint as a self-contained bundle."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
sys.stdout = sys.stderr

from captionflow.deploy.bundle import export_model
from captionflow.errors import one_line_errors

with one_line_errors():
    export_model(
        checkpoint_path=snakemake.input.checkpoint,
        labels_json=snakemake.input.labels_json,
        features=snakemake.input.features,
        manifest=snakemake.input.manifest,
        metrics_json=snakemake.input.metrics,
        signature=snakemake.input.get("signature"),
        decoding={k: v for k, v in snakemake.params.decoding.items() if k != "device"},
        experiment=snakemake.wildcards.experiment,
        stages=snakemake.params.stages,
        config_sha256=snakemake.params.config_sha256,
        out_bundle=snakemake.output.bundle,
        out_card=snakemake.output.card,
        seed=snakemake.params.seed,
    )
