"""Stage report_metrics (rule report_metrics_job, one job per experiment): an experiment's per-stage test metrics side by side."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
sys.stdout = sys.stderr

from captionflow.evaluation.captioning import report_stages

report_stages(
    stage_reports=dict(snakemake.input.items()), out_json=snakemake.output.json, out_table=snakemake.output.table
)
