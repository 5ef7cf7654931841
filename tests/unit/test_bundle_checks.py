"""What a bundle carries is checked against itself at load: NaN weights, a vocabulary that
does not fit its hash or the model's output layer, preprocessing that does not fit the
backbone, and an ONNX export of another bundle are refused in one line that names the
file, what differs and what to do. Each bundle is tampered with the way a user's file goes
wrong: loaded with weights_only, one field changed, saved again."""

import json

import pytest
import torch

import captionflow
from captionflow.data.labels import vocab_hash
from captionflow.deploy.captioner import Captioner
from captionflow.errors import CaptionflowError
from captionflow.features.backbones import create_backbone
from captionflow.models import create_model
from tests.unit.conftest import _checkpoint, _export, _test_images


def _tampered(bundle, path, change=None):
    """A copy of `bundle`'s file at `path`, re-saved after change(raw) (None: untouched)."""
    raw = torch.load(bundle / "bundle.pt", weights_only=True)
    if change is not None:
        change(raw)
    torch.save(raw, path)
    return path


def _refused(path, *parts, **kw):
    """Loading `path` raises one line that names it and holds each of `parts` -> the message."""
    with pytest.raises(CaptionflowError) as err:
        Captioner(path, device="cpu", **kw)
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    assert str(path) in message, message
    for part in parts:
        assert part in message, f"{part!r} not in: {message}"
    return message


def test_the_untampered_copy_loads_and_captions_identically(bundle, tiny_data, tmp_path):
    """The control of every test below: re-saving a bundle changes nothing it does."""
    images = _test_images(tiny_data)[:3]
    copy = _tampered(bundle, tmp_path / "copy.pt")
    want = captionflow.load(bundle, device="cpu").caption(images, beam_size=1)
    assert captionflow.load(copy, device="cpu").caption(images, beam_size=1) == want
    assert all(isinstance(c, str) for c in want)


@pytest.mark.parametrize(
    ("part", "key", "value"),
    [("model", "logit.weight", float("nan")), ("backbone", "trunk.0.weight", float("inf"))],
    ids=["model-nan", "backbone-inf"],
)
def test_nonfinite_weights_are_refused_naming_the_tensor(bundle, tmp_path, part, key, value):
    def poison(raw):
        raw[part]["weights"][key].view(-1)[0] = value

    path = _tampered(bundle, tmp_path / "bad.pt", poison)
    message = _refused(path, f"{part} weight {key}", "NaN or inf", "export")
    assert "model weight" not in message or part == "model"


def test_a_shuffled_vocabulary_is_refused_by_its_recorded_hash(bundle, tmp_path):
    def shuffle(raw):
        words = raw["vocabulary"]["ix_to_word"]
        words["1"], words["2"] = words["2"], words["1"]

    recorded = torch.load(bundle / "bundle.pt", weights_only=True)["vocabulary"]["hash"]
    path = _tampered(bundle, tmp_path / "shuffled.pt", shuffle)
    shuffled = vocab_hash(torch.load(path, weights_only=True)["vocabulary"]["ix_to_word"])
    assert shuffled != recorded
    _refused(path, "vocabulary", recorded, shuffled, "export")


@pytest.mark.parametrize("drop", [2, -1], ids=["shorter", "longer"])
def test_a_vocabulary_of_another_size_than_the_output_layer_is_refused(bundle, tmp_path, drop):
    """Its hash recomputed, so only the size tells (a bundle assembled from two runs' files)."""
    raw = torch.load(bundle / "bundle.pt", weights_only=True)
    n = len(raw["vocabulary"]["ix_to_word"])
    assert raw["model"]["weights"]["logit.weight"].shape[0] == n + 1  # the output layer: the words and the end

    def resize(raw):
        words = raw["vocabulary"]["ix_to_word"]
        if drop > 0:
            for i in range(n - drop + 1, n + 1):
                del words[str(i)]
        else:
            words[str(n + 1)] = "extra"
        raw["vocabulary"]["hash"] = vocab_hash(words)

    path = _tampered(bundle, tmp_path / "resized.pt", resize)
    _refused(path, f"vocabulary has {n - drop} words", f"{n}", "export")


def _vit_bundle(bundle, path, size=64):
    """The bundle with a timm ViT backbone built for `size` px and a model of its width."""
    raw = torch.load(bundle / "bundle.pt", weights_only=True)
    backbone = create_backbone("test_vit", "none", 0, size)
    args = {**raw["model"]["args"], "feat_dim": backbone.out_dim}
    torch.manual_seed(0)
    raw["model"] = {**raw["model"], "args": args, "weights": create_model(raw["model"]["name"], **args).state_dict()}
    raw["backbone"] = {"name": "test_vit", "image_size": size, "grid_size": 0, "weights": backbone.state_dict()}
    raw["features"] = {**raw["features"], "source": "test_vit", "regions": (size // 16) ** 2}
    raw["preprocess"]["size"] = size
    torch.save(raw, path)
    return path


def _set(section, **values):
    def change(raw):
        raw[section].update(values)

    return change


@pytest.mark.parametrize("case", ["resnet-size", "vit-size", "grid", "dtype"])
def test_preprocessing_that_does_not_fit_the_backbone_is_refused(bundle, tiny_data, tmp_path, case):
    if case == "vit-size":  # a ViT built for 64 px silently reads 96 px images as 36 regions, not 16
        vit = _vit_bundle(bundle, tmp_path / "vit.pt")
        assert len(captionflow.load(vit, device="cpu").caption(_test_images(tiny_data)[:2])) == 2  # control
        raw = torch.load(vit, weights_only=True)
        raw["preprocess"]["size"] = 96
        torch.save(raw, path := tmp_path / "bad.pt")
        _refused(path, "96 px", "test_vit", "64 px", "export")
    elif case == "resnet-size":  # resnet18 at 96 px: a 3 x 3 grid, the model read 2 x 2
        path = _tampered(bundle, tmp_path / "bad.pt", _set("preprocess", size=96))
        _refused(path, "96 px", "resnet18", "64 px", "export")
    elif case == "grid":  # sizes that agree with each other, but not with the features the model read

        def both(raw):
            raw["preprocess"]["size"] = raw["backbone"]["image_size"] = 96

        path = _tampered(bundle, tmp_path / "bad.pt", both)
        _refused(path, "9 regions", "4 regions", "export")
    else:
        path = _tampered(bundle, tmp_path / "bad.pt", _set("preprocess", feature_dtype="bfloat8"))
        _refused(path, "bfloat8", "float16", "export")


def _onnx_dir(bundle, out):
    from captionflow.deploy.onnx import export_bundle

    return export_bundle(bundle, out)


def test_an_onnx_export_of_another_bundle_is_refused_naming_both(bundle, tiny_data, tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = _onnx_dir(bundle, tmp_path / "onnx")
    images = _test_images(tiny_data)[:3]
    # control: its own bundle captions on onnxruntime as on PyTorch
    assert Captioner(bundle, device="cpu", onnx=onnx).caption(images, beam_size=1) == Captioner(
        bundle, device="cpu"
    ).caption(images, beam_size=1)
    _checkpoint(tiny_data, tmp_path / "other.pt", seed=1, embed_size=16, hidden_size=32)
    other = _export(tiny_data, tmp_path / "other", tmp_path / "other.pt") / "bundle.pt"
    message = _refused(other, str(bundle / "bundle.pt"), str(onnx), "export-onnx", onnx=onnx)
    assert "fingerprint" in message


def test_an_onnx_manifest_without_its_bundle_is_refused_with_what_to_do(bundle, tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = _onnx_dir(bundle, tmp_path / "onnx")
    manifest = json.loads((onnx / "manifest.json").read_text())
    manifest.pop("bundle", None)  # what an older captionflow wrote
    (onnx / "manifest.json").write_text(json.dumps(manifest))
    _refused(bundle / "bundle.pt", str(onnx), "records no bundle", "export-onnx", onnx=onnx)


def test_a_version_1_bundle_loads_without_the_grid_and_a_version_2_one_needs_it(bundle, tiny_data, tmp_path):
    """Version 1 bundles recorded no feature grid: they still load and caption alike; a
    version 2 bundle without it is damaged."""

    def version_1(raw):
        raw["version"] = 1
        del raw["features"]["regions"]

    images = _test_images(tiny_data)[:3]
    old = _tampered(bundle, tmp_path / "v1.pt", version_1)
    assert captionflow.load(old, device="cpu").caption(images, beam_size=1) == captionflow.load(
        bundle, device="cpu"
    ).caption(images, beam_size=1)
    path = _tampered(bundle, tmp_path / "bad.pt", lambda raw: raw["features"].pop("regions"))
    _refused(path, "features.regions", "export")
