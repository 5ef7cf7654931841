# The run's values, read from the validated config: the data source, the feature source,
# the experiments and their stages, the ensembles, and which experiments get what (fine-
# tuning, retrieval, attention maps, a blind twin). Their files: paths.smk.
from captionflow.report import ATTENTION_MODELS

DEMO = config["data"]["source"] == "demo"
CUHK_PEDES = config["data"]["source"] == "cuhk_pedes"

# Splits written by prepro_labels; restval joins train unless configured otherwise.
SPLITS = ["train", "val", "test"] + (
    [] if config["labels"]["restval_to_train"] else ["restval"]
)

# The source of the feature files: extract_features (grid), import_bottomup or extract_regions.
REGION_SOURCES = ("bottomup_tsv", "fasterrcnn_resnet50_fpn")
FEATURE_SOURCE = config["features"]["backbone"]
# The network that makes the grid features (captionflow.features.backbones.Backbone), one
# value for every job that runs it (extraction, regeneration, e2e, scst_e2e, retrieval).
BACKBONE = {
    "name": config["features"]["backbone"],
    "weights": config["features"]["weights"],
    "seed": config["seed"],
    "image_size": config["resize"]["size"],
    "grid_size": config["features"]["grid_size"],
}

EXPERIMENTS = config["experiments"]
# Ensembles (config `ensembles`): experiments of this config decoding together.
ENSEMBLES = config["ensembles"]
REPORT = config["report"]


wildcard_constraints:
    experiment="|".join(EXPERIMENTS) or "no_experiments",
    ensemble="|".join(ENSEMBLES) or "no_ensembles",
    name="|".join([*EXPERIMENTS, *ENSEMBLES]) or "no_experiments",


def retrieval_only(experiment):
    """Whether `experiment` trains only a retrieval model (`retrieval:` and no `model:`;
    the schema has refused captioner keys beside it)."""
    return "model" not in EXPERIMENTS[experiment]


# The experiments that train a captioner: every captioning job (train, evaluate, export,
# the report's figures) is planned for these; a retrieval-only experiment gets only
# train_retrieval and evaluate_retrieval.
CAPTIONING = [name for name in EXPERIMENTS if not retrieval_only(name)]


def stages(experiment):
    """Experiment `experiment`'s stages, in order (one of STAGE_GRAPHS); none for a
    retrieval-only experiment (the schema fills `stages`' default in, and it is not used).
    """
    if retrieval_only(experiment):
        return []
    return EXPERIMENTS[experiment]["stages"]


def last_stage(experiment):
    return stages(experiment)[-1]


def experiments_with(stage):
    return [name for name in EXPERIMENTS if stage in stages(name)]


# Experiments that fine-tune their backbone (their features are regenerated with it).
E2E_EXPERIMENTS = experiments_with("e2e")

RETRIEVAL_EXPERIMENTS = [
    name for name in EXPERIMENTS if "retrieval" in EXPERIMENTS[name]
]


def retrieval_end_to_end(name):
    """Whether experiment `name`'s retrieval model fine-tunes its backbone from the images."""
    return EXPERIMENTS[name]["retrieval"]["finetune_backbone_after"] >= 0


def reranker(name):
    """The experiment whose retrieval model reranks `name`'s beams, or None (check_config
    has made sure that it has a retrieval model; a retrieval-only experiment may be it, and
    has no beams of its own)."""
    if retrieval_only(name):
        return None
    settings = EXPERIMENTS[name]["evaluate"]
    if not settings["rerank_k"]:
        return None
    return settings["rerank_model"] or name


# Attention maps need a model that attends over regions, a grid to draw them on, and an
# image behind it (a blind model attends over zeros).
ATTENTION_EXPERIMENTS = [
    name
    for name in CAPTIONING
    if EXPERIMENTS[name]["model"] in ATTENTION_MODELS
    and not EXPERIMENTS[name]["blind"]
    and FEATURE_SOURCE not in REGION_SOURCES
    and REPORT["attention_images"] > 0
]

# An experiment's image-blind twin: an experiment of the same model on zeroed features
# (the report's table shows the gap at each stage both have).
BLIND_TWINS = {
    name: twins[0]
    for name in CAPTIONING
    if not EXPERIMENTS[name]["blind"]
    and (
        twins := [
            twin
            for twin in CAPTIONING
            if EXPERIMENTS[twin]["blind"]
            and EXPERIMENTS[twin]["model"] == EXPERIMENTS[name]["model"]
        ]
    )
}
