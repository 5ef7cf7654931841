# Checks of the machine and the working directory rather than of the config: Java for
# evaluate (at workflow start) and no `--report` while another run is going on (at parse).
import os
import sys


def java_preflight():
    """Stop at workflow start, in one line, when evaluate will need Java and there is none."""
    if CAPTIONING or ENSEMBLES:
        from captionflow.metrics.coco import java_available

        reason = java_available()
        if reason:
            raise WorkflowError(f"preflight: {reason}")


onstart:
    java_preflight()


# `snakemake --report` packs the report items that exist and Snakemake's records of the
# jobs. While another Snakemake runs in this directory those are half-written: a figure
# folder being filled, last run's pages beside the checkpoints being retrained. A running
# Snakemake holds its lock files in .snakemake/locks until it ends (`--unlock` clears those
# of a killed one); Snakemake's report takes no lock and tells the Snakefile nothing, so
# the command line says that this is `--report`, and the report is refused here.
LOCKS = ".snakemake/locks"
if (
    workflow.is_main_process
    and any(arg == "--report" or arg.startswith("--report=") for arg in sys.argv)
    and os.path.isdir(LOCKS)
    and any(name.endswith(".lock") for name in os.listdir(LOCKS))
):
    raise WorkflowError(
        f"a Snakemake run is in progress in {os.getcwd()} (its lock files are in {LOCKS}): "
        "a report now would hold its half-written results; make the report when the run "
        "has ended (no run going on? a killed one left its lock behind: snakemake --unlock)"
    )
