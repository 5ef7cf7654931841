"""Rule report_tables: the report's metrics table (every experiment x stage) and run-time/memory table."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
sys.stdout = sys.stderr

from captionflow.errors import one_line_errors
from captionflow.report.tables import write_benchmarks_table, write_metrics_table

with one_line_errors():
    write_metrics_table(
        experiments=snakemake.params.experiments,
        blind_twins=snakemake.params.blind_twins,
        out_html=snakemake.output.metrics,
        out_tsv=snakemake.output.table,
        retrieval=snakemake.params.retrieval,
    )
    write_benchmarks_table(root=snakemake.params.benchmarks, out_html=snakemake.output.benchmarks)
