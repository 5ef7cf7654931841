# The report's values: which experiments get which figures, their blind twins, the tables'
# inputs and the report targets of `all` (the rules: report.smk).
from captionflow.report import ATTENTION_MODELS

REPORT = config["report"]
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
