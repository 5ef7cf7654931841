"""The embedded demo dataset: deterministic, Karpathy-shaped, captions that need the image."""

import hashlib
import json
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from pycocoevalcap.cider.cider import Cider

from captionflow.data.demo import COLORS, SHAPE_WORDS, describe, make_demo_dataset
from captionflow.data.karpathy import load_karpathy

SPLITS = {"train": 30, "restval": 5, "val": 5, "test": 10}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root / "dataset_coco.json", root / "images", SPLITS, seed=3, min_side=64, max_side=96)
    return root


def _digest(root):
    h = hashlib.sha256((root / "dataset_coco.json").read_bytes())
    for p in sorted((root / "images").iterdir()):
        h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(demo, tmp_path):
    again = tmp_path / "again"
    make_demo_dataset(again / "dataset_coco.json", again / "images", SPLITS, seed=3, min_side=64, max_side=96)
    assert _digest(again) == _digest(demo)
    other = tmp_path / "other"
    make_demo_dataset(other / "dataset_coco.json", other / "images", SPLITS, seed=4, min_side=64, max_side=96)
    assert _digest(other) != _digest(demo)


def test_karpathy_schema(demo):
    data = json.loads((demo / "dataset_coco.json").read_text())
    assert Counter(img["split"] for img in data["images"]) == SPLITS
    for img in data["images"]:
        assert {"filepath", "filename", "imgid", "cocoid", "split", "sentids", "sentences"} <= set(img)
        assert (demo / img["filepath"] / img["filename"]).is_file()
        assert len(img["sentences"]) == 5
        assert img["sentids"] == [s["sentid"] for s in img["sentences"]]
        for s in img["sentences"]:
            assert s["imgid"] == img["imgid"]
            assert s["tokens"] == [t for t in s["tokens"] if t == t.lower()]
            assert s["raw"].endswith(".")
    # and our own reader accepts it
    assert len(load_karpathy(demo / "dataset_coco.json")) == sum(SPLITS.values())


def test_captions_describe_the_pixels(demo):
    data = json.loads((demo / "dataset_coco.json").read_text())
    shape_words = {w: k for k, ws in SHAPE_WORDS.items() for w in ws}
    for img in data["images"]:
        scene = img["demo_scene"]
        colors = {o["color"] for o in scene["objects"]}
        shapes = {o["shape"] for o in scene["objects"]}
        for s in img["sentences"]:
            assert {t for t in s["tokens"] if t in COLORS} <= colors, s["raw"]
            assert {shape_words[t] for t in s["tokens"] if t in shape_words} <= shapes
        # the pixel at each object's centre has that object's colour (nothing drawn on top)
        pixels = np.asarray(Image.open(demo / img["filepath"] / img["filename"]).convert("RGB"), dtype=float)
        side = pixels.shape[0]
        last = scene["objects"][-1]  # drawn last, so never covered
        y, x = int(last["cy"] * side), int(last["cx"] * side)
        if last["shape"] != "star":  # a star's centre is inside it too, but thin arms blur at 64 px
            assert np.abs(pixels[y, x] - COLORS[last["color"]]).max() < 40


def test_a_blind_captioner_scores_far_worse(demo):
    """Captions written from the scene beat the single best image-blind caption in CIDEr-D."""
    data = json.loads((demo / "dataset_coco.json").read_text())
    refs = {img["cocoid"]: [" ".join(s["tokens"]) for s in img["sentences"]] for img in data["images"]}
    rng = random.Random(99)
    seeing = {img["cocoid"]: [describe(img["demo_scene"], rng, 1)[0]] for img in data["images"]}
    # the blind captioner always says the most frequent training caption
    most_common = Counter(c for caps in refs.values() for c in caps).most_common(1)[0][0]
    blind = {k: [most_common] for k in refs}
    seeing_score, _ = Cider().compute_score(refs, seeing)
    blind_score, _ = Cider().compute_score(refs, blind)
    print(f"CIDEr-D seeing {seeing_score:.3f} vs blind {blind_score:.3f}")
    assert seeing_score > 1.0
    assert seeing_score > 5 * blind_score
