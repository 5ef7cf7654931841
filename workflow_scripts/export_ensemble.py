"""Stage export_model (rule export_ensemble_job, one job per ensemble): the members' bundles as one ensemble bundle."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
sys.stdout = sys.stderr

from captionflow.deploy.bundle import export_ensemble
from captionflow.errors import one_line_errors

with one_line_errors():
    export_ensemble(
        member_bundles=list(snakemake.input.members),
        metrics_json=snakemake.input.metrics,
        decoding={k: v for k, v in snakemake.params.decoding.items() if k != "device"},
        ensemble=snakemake.wildcards.ensemble,
        config_sha256=snakemake.params.config_sha256,
        out_bundle=snakemake.output.bundle,
        out_card=snakemake.output.card,
    )
