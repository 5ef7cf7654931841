"""Every registered model learns to look at the demo images: it beats its image-blind twin.

The demo dataset as the default config builds it (1000 scenes, 128 px, random-init
ResNet-18 grid features), once for the file. Each model trains with cross-entropy twice
with the same settings, on the features and on zeroed features (`blind: true`), and both
checkpoints caption the test split with beam 3. A blind model sees the same input for
every image, so it writes one caption for all of them; a model that beats it has learnt
something from the pixels.
"""

import json

import pytest
import torch
import yaml

from captionflow.config import build
from captionflow.data.captions import SplitData
from captionflow.evaluation.split_captions import caption_split, cider_d
from captionflow.models import MODELS, checkpoint
from captionflow.training import xe
from tests.conftest import build_demo_data
from tests.workflow.conftest import REPO

# a model's two trainings took up to 250 s in a make test run sharing its 2 cores with a demo
pytestmark = pytest.mark.timeout(600)

DEMO = yaml.safe_load((REPO / "config.yaml").read_text())

# Small members of each family; 4 XE epochs at lr 2e-3 (fc, the cheapest, 6).
ZOO = {
    "fc": ({"embed_size": 128, "hidden_size": 256}, 6),
    "show_attend_tell": ({"embed_size": 128, "hidden_size": 256, "att_size": 128}, 4),
    "aoanet": ({"embed_size": 128, "hidden_size": 128, "refiner_layers": 1, "n_heads": 4}, 4),
    "transformer": ({"embed_size": 128, "hidden_size": 256, "n_layers": 2, "n_heads": 4}, 4),
    "expansionnet_v2": (
        {
            "embed_size": 128,
            "hidden_size": 256,
            "n_enc_layers": 2,
            "n_dec_layers": 2,
            "n_heads": 4,
            "enc_expansions": [8, 16],
            "dec_expansions": 8,
        },
        4,
    ),
}


def test_the_zoo_covers_the_registry():
    assert set(ZOO) == set(MODELS)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    data, resize = DEMO["data"]["demo"], DEMO["resize"]
    return build_demo_data(
        tmp_path_factory.mktemp("demo"),
        data["splits"],
        seed=DEMO["seed"],
        word_count_threshold=DEMO["labels"]["word_count_threshold"],
        threads=2,
        feature_batch=32,
        sides=(data["min_side"], data["max_side"]),
        size=resize["size"],
    )


def _train_and_score(demo, out, name, blind):
    model_args, epochs = ZOO[name]
    cfg = build(xe.XEConfig, epochs=epochs, batch_size=50, lr=2e-3, warmup_steps=20, patience=epochs, device="cpu")
    files = [demo / f for f in ("train.h5", "val.h5", "labels.h5", "labels.json", "references.json")]
    xe.train(
        *files, out / "model.pt", out / "history.tsv", name, {**model_args, "dropout": 0.1}, cfg, blind=blind, threads=2
    )
    vocab_hash = json.loads((demo / "labels.json").read_text())["vocab_hash"]
    model, _ = checkpoint.load_model(out / "model.pt", vocab_hash)
    test = SplitData(demo / "labels.h5", demo / "labels.json", demo / "test.h5", "test", blind=blind)
    captions = caption_split(
        model, test.features.get, test.image_ids, test.ix_to_word, torch.device("cpu"), beam_size=3, max_len=16
    )
    references = json.loads((demo / "references.json").read_text())["test"]
    return cider_d(references, captions), len(set(captions.values())), sum(p.numel() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ZOO))
def test_model_trains_on_the_demo_and_beats_its_blind_twin(demo, tmp_path, name, report_figure):
    seeing, distinct, params = _train_and_score(demo, tmp_path / "seeing", name, blind=False)
    blind, blind_distinct, _ = _train_and_score(demo, tmp_path / "blind", name, blind=True)
    report_figure(
        f"demo test CIDEr-D (beam 3), {name} ({params / 1e6:.2f} M parameters, {ZOO[name][1]} XE epochs): "
        f"{seeing:.3f} ({distinct} distinct captions) vs image-blind twin {blind:.3f}"
    )
    assert blind_distinct == 1  # the blind twin says the same thing about every image
    # fc, the weakest, is the tightest: 0.546 vs 0.361 with 1 thread (make test), 0.511 vs
    # 0.361 with 2 (a plain pytest run on 2 cores; it failed a +0.15 margin by 0.0003)
    assert seeing > blind + 0.1 and seeing > 1.3 * blind
