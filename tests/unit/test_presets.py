"""The papers' presets (presets/*.yaml): valid configs whose models build at full size."""

from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from captionflow.models import create_model

ROOT = Path(__file__).parents[2]
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))
FEAT_DIM = {"resnet101": 2048, "bottomup_tsv": 2048, "swin_large_patch4_window12_384": 1536}
# Parameter counts with a 10k vocabulary, unchanged since the models moved onto the shared
# layers (captionflow/layers): a layer that grows or loses a projection changes them.
PARAMETERS = {"aoanet_coco": 86_611_729, "expansionnet_v2_coco": 38_598_417, "show_attend_tell_coco": 32_284_947}


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_is_a_valid_config_and_its_models_build(path, report_figure):
    config = yaml.safe_load(path.read_text())
    validate(config, str(ROOT / "captionflow/config.schema.yaml"))  # fills defaults, raises on a bad key
    feat_dim = FEAT_DIM[config["features"]["backbone"]]
    for experiment in config["experiments"].values():
        model = create_model(experiment["model"], vocab_size=10000, feat_dim=feat_dim, **experiment["model_args"])
        count = sum(p.numel() for p in model.parameters())
        report_figure(
            f"preset {path.stem}: {experiment['model']} {count / 1e6:.1f} M parameters (vocabulary 10000, {feat_dim}-d features)"
        )
        assert count == PARAMETERS[path.stem]
