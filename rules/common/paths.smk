# Where the run's files live: every path under results/ that the helpers build (the rules
# name the same files as patterns in their `output:`; the two must agree).

# The Karpathy-schema caption file every data stage reads: generated for the demo and for
# CUHK-PEDES (rule import_cuhk_pedes), the user's own otherwise.
CAPTIONS = {
    "demo": "results/demo/dataset_coco.json",
    "karpathy": config["data"]["karpathy_json"],
    "cuhk_pedes": "results/data/cuhk_pedes/dataset_coco.json",
}[config["data"]["source"]]
DEMO_IMAGES = "results/demo/images"
IMAGES_ROOT = "results/demo" if DEMO else config["data"]["images_root"]

# Features: one HDF5 per split from the configured backbone; an experiment that fine-tunes
# its backbone regenerates them (features_e2e), and scst_e2e once more for its test split.
FEATURE_DIR = f"results/features/{config['features']['backbone']}"
FEATURE_FILES = {split: f"{FEATURE_DIR}/{split}.h5" for split in SPLITS}
E2E_FEATURES = {
    name: {split: f"results/{name}/features_e2e/{split}.h5" for split in SPLITS}
    for name in E2E_EXPERIMENTS
}
SCST_E2E_FEATURES = {
    name: {"test": f"results/{name}/features_scst_e2e/test.h5"}
    for name in experiments_with("scst_e2e")
}


def features_of(name, stage, split):
    """The features experiment `name`'s `stage` reads. Stages after e2e (and e2e's own test
    evaluation) read the regenerated ones, scst_e2e's test evaluation those of its own
    backbone; everything else the original extraction."""
    order = stages(name)
    if stage == "scst_e2e":
        return SCST_E2E_FEATURES[name][split]
    if "e2e" in order and order.index(stage) >= order.index("e2e"):
        return E2E_FEATURES[name][split]
    return FEATURE_FILES[split]


def model_file(name, stage):
    """The checkpoint experiment `name`'s `stage` writes (`retrieval`: its retrieval model)."""
    return f"results/{name}/{stage}/model.pt"


def reward_file(name, stage):
    """The reward signature a self-critical stage (scst, scst_e2e) writes."""
    return f"results/{name}/{stage}/reward.txt"


def stage_metrics_file(name, stage):
    """Test metrics of experiment `name` after `stage` (`ensemble`: an ensemble's own,
    `retrieval`: its retrieval model's)."""
    return f"results/{name}/test/{stage}/metrics.json"


def predictions_file(name, stage):
    return f"results/{name}/test/{stage}/predictions.json"


def metrics_file(name):
    """The per-stage metrics of an experiment or ensemble, side by side."""
    return f"results/{name}/test/metrics.json"


def bundle_file(name):
    return f"results/{name}/export/bundle.pt"


METRICS_FILES = [metrics_file(name) for name in CAPTIONING]
ENSEMBLE_METRICS = [metrics_file(name) for name in ENSEMBLES]
EXPORT_FILES = [bundle_file(name) for name in [*CAPTIONING, *ENSEMBLES]]
ONNX_DIRS = [f"results/{name}/export/onnx" for name in CAPTIONING]
RETRIEVAL_MODELS = [model_file(name, "retrieval") for name in RETRIEVAL_EXPERIMENTS]
RETRIEVAL_METRICS = [
    stage_metrics_file(name, "retrieval") for name in RETRIEVAL_EXPERIMENTS
]

# The report: each experiment's curves and gallery, attention maps, the two tables.
EXPERIMENT_FIGURES = [
    f"results/{name}/report/{item}"
    for name in CAPTIONING
    for item in ("curves", "gallery.html")
]
ATTENTION_MAPS = [f"results/{name}/report/attention" for name in ATTENTION_EXPERIMENTS]
FIGURE_FILES = EXPERIMENT_FIGURES + ATTENTION_MAPS
# (no experiment, no table: a data-only run ends at the features)
REPORT_FILES = FIGURE_FILES + (
    ["results/report/metrics.html", "results/report/benchmarks.html"]
    if EXPERIMENTS or ENSEMBLES
    else []
)
# Each captioning experiment's and ensemble's per-stage test metrics, in the table's order.
TABLE_METRICS = {
    **{
        name: {s: stage_metrics_file(name, s) for s in stages(name)}
        for name in CAPTIONING
    },
    **{name: {"ensemble": stage_metrics_file(name, "ensemble")} for name in ENSEMBLES},
}

# Each retrieval model's test metrics, the report's retrieval table.
RETRIEVAL_TABLE = {
    name: stage_metrics_file(name, "retrieval") for name in RETRIEVAL_EXPERIMENTS
}

# Downloads for offline compute nodes (rules/prefetch.smk): SPICE's jars when a captioner is
# evaluated, the backbone's pretrained weights when features.weights is imagenet (or coco
# for the detector).
PREFETCH_DIR = "results/prefetch"
PREFETCH_REPORTS = []
if CAPTIONING or ENSEMBLES:
    PREFETCH_REPORTS.append(f"{PREFETCH_DIR}/spice.json")
if config["features"]["weights"] in ("imagenet", "coco"):
    PREFETCH_REPORTS.append(f"{PREFETCH_DIR}/weights/{FEATURE_SOURCE}.json")
