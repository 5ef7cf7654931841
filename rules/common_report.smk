# The report's values: which experiments get which figures, their blind twins, the tables'
# inputs and the report targets of `all` (the rules: report.smk).
from captionflow.report import ATTENTION_MODELS

REPORT = config["report"]

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

if REPORT["attention_images"] > REPORT["gallery_images"]:
    raise WorkflowError(
        f"invalid config at report.attention_images: {REPORT['attention_images']} is more "
        f"than report.gallery_images ({REPORT['gallery_images']}); the maps are drawn for "
        "gallery images"
    )

# Attention maps need a model that attends over regions, a grid to draw them on, and an
# image behind it (a blind model attends over zeros).
ATTENTION_EXPERIMENTS = [
    name
    for name in EXPERIMENTS
    if EXPERIMENTS[name]["model"] in ATTENTION_MODELS
    and not EXPERIMENTS[name]["blind"]
    and FEATURE_SOURCE not in REGION_SOURCES
    and REPORT["attention_images"] > 0
]

# An experiment's image-blind twin: an experiment of the same model on zeroed features
# (the table shows the gap at each stage both have).
BLIND_TWINS = {
    name: twins[0]
    for name in EXPERIMENTS
    if not EXPERIMENTS[name]["blind"]
    and (
        twins := [
            twin
            for twin in EXPERIMENTS
            if EXPERIMENTS[twin]["blind"]
            and EXPERIMENTS[twin]["model"] == EXPERIMENTS[name]["model"]
        ]
    )
}


# Each experiment's and ensemble's per-stage test metrics, in the table's order.
TABLE_METRICS = {
    **{
        name: {s: f"results/{name}/test/{s}/metrics.json" for s in stages(name)}
        for name in EXPERIMENTS
    },
    **{
        name: {"ensemble": f"results/{name}/test/ensemble/metrics.json"}
        for name in ENSEMBLES
    },
}

STAGE_OUTPUTS["plot_experiment"] = [
    f"results/{name}/report/{item}"
    for name in EXPERIMENTS
    for item in ("curves", "gallery.html")
]
STAGE_OUTPUTS["plot_attention"] = [
    f"results/{name}/report/attention" for name in ATTENTION_EXPERIMENTS
]
FIGURE_FILES = STAGE_OUTPUTS["plot_experiment"] + STAGE_OUTPUTS["plot_attention"]
# (no experiment, no table: a data-only run ends at the features)
REPORT_FILES = FIGURE_FILES + (
    ["results/report/metrics.html", "results/report/benchmarks.html"]
    if EXPERIMENTS or ENSEMBLES
    else []
)


def stage_files(pattern):
    """Input function: `pattern` ({stage} in it) for each stage of the experiment, in order."""
    return lambda wildcards: [
        f"results/{wildcards.experiment}/{pattern.format(stage=s)}"
        for s in stages(wildcards.experiment)
    ]
