"""Backbones and extract_features: layout, order, dtypes, weights files, chunked resume."""

import json

import h5py
import numpy as np
import pytest
import torch
import torchvision

from captionflow.config import build
from captionflow.errors import CaptionflowError
from captionflow.features import backbones, extract
from captionflow.features.backbones import BACKBONES, Backbone, create_backbone
from captionflow.features.extract import FeatureConfig, extract_features


@pytest.fixture(scope="module")
def data(tiny_data):
    return tiny_data


def _read(path):
    with h5py.File(path) as f:
        return {k: f[k][()] for k in f}, dict(f.attrs)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_registry_backbones_give_grids(name):
    backbone = create_backbone(name, "none", seed=0).eval()
    with torch.no_grad():
        grid = backbone(torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8))
    assert grid.shape == (2, backbone.out_dim, 2, 2)
    assert torch.isfinite(grid).all()


def test_random_init_follows_the_seed():
    a, b, c = (create_backbone("resnet18", "none", seed=s).state_dict() for s in (5, 5, 6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["trunk.0.weight"], c["trunk.0.weight"])


def test_local_weights_file_in_torchvision_layout(tmp_path):
    torch.manual_seed(123)
    reference = torchvision.models.resnet18().eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, tmp_path / "r18.pth")
    backbone = create_backbone("resnet18", str(tmp_path / "r18.pth")).eval()
    x = torch.rand(1, 3, 64, 64) * 255
    trunk = torch.nn.Sequential(*list(reference.children())[:-2])
    with torch.no_grad():
        expected = trunk(
            (x / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
            / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        )
        assert torch.allclose(backbone(x), expected, atol=1e-4)


def test_weights_of_another_model_are_refused(tmp_path):
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(CaptionflowError) as err:
        create_backbone("resnet50", str(tmp_path / "r34.pth"))
    message = str(err.value)
    assert "do not fit backbone resnet50" in message and "shape mismatches" in message and "\n" not in message
    with pytest.raises(CaptionflowError, match="does not exist"):
        create_backbone("resnet18", str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CaptionflowError, match="cannot be read"):
        create_backbone("resnet18", str(tmp_path / "junk.pth"))


def test_unknown_backbone_and_missing_cuda():
    with pytest.raises(CaptionflowError, match="unknown backbone 'resnet19': neither one of resnet101"):
        create_backbone("resnet19")
    if not torch.cuda.is_available():
        with pytest.raises(CaptionflowError, match="no CUDA device"):
            extract.resolve_device("cuda")


def _extract(data, out_dir, backbone="resnet18", weights="none", grid_size=0, **cfg):
    cfg = build(FeatureConfig, **{"batch_size": 4, "num_workers": 0, "chunk_batches": 1, **cfg})
    outputs = {s: out_dir / f"{s}.h5" for s in ("train", "val", "test")}
    extract_features(
        data / "labels.json", data / "manifest.json", outputs, Backbone(backbone, weights, 0, 64, grid_size), cfg
    )
    return outputs


def test_layout_order_and_dtypes(data, tmp_path):
    index = json.loads((data / "labels.json").read_text())
    out32 = _extract(data, tmp_path / "f32")
    out16 = _extract(data, tmp_path / "f16", dtype="float16", grid_size=1)
    for split, path in out32.items():
        arrays, attrs = _read(path)
        ids = [img["id"] for img in index["images"] if img["split"] == split]
        assert arrays["image_id"].tolist() == ids
        assert arrays["att"].shape == (len(ids), 4, 512) and arrays["att"].dtype == np.float32
        assert arrays["fc"].shape == (len(ids), 512)
        assert np.allclose(arrays["fc"], arrays["att"].mean(axis=1), atol=1e-5)
        assert attrs["backbone"] == "resnet18" and attrs["image_size"] == 64
        half, _ = _read(out16[split])
        assert half["att"].shape == (len(ids), 1, 512) and half["att"].dtype == np.float16
        assert np.allclose(half["fc"], arrays["fc"], rtol=2e-3, atol=2e-3)
    assert not list(tmp_path.rglob("*.partial*"))


class _Crash(Exception):
    pass


def test_crash_after_a_chunk_resumes_to_identical_file(data, tmp_path, monkeypatch, capsys):
    reference = _extract(data, tmp_path / "ref")
    real_forward = backbones.GridFeatures.forward
    calls = {"n": 0}

    def crashing_forward(self, images):
        calls["n"] += 1
        if calls["n"] == 4:  # the shape probe, then two train batches, then crash
            raise _Crash
        return real_forward(self, images)

    monkeypatch.setattr(backbones.GridFeatures, "forward", crashing_forward)
    with pytest.raises(_Crash):
        _extract(data, tmp_path / "run")
    partial = tmp_path / "run" / "train.h5.partial"
    assert partial.exists() and not (tmp_path / "run" / "train.h5").exists()
    assert json.loads((tmp_path / "run" / "train.h5.partial.json").read_text())["rows_done"] == 8
    monkeypatch.setattr(backbones.GridFeatures, "forward", real_forward)
    capsys.readouterr()
    resumed = _extract(data, tmp_path / "run")
    assert "resuming train.h5 at row 8 of 20" in capsys.readouterr().out
    for split in resumed:
        a, _ = _read(resumed[split])
        b, _ = _read(reference[split])
        assert all(np.array_equal(a[k], b[k]) for k in b)


def test_changed_settings_do_not_resume(data, tmp_path, capsys):
    out = tmp_path / "f"
    out.mkdir()
    (out / "train.h5.partial").write_bytes(b"stale")
    (out / "train.h5.partial.json").write_text(json.dumps({"fingerprint": "other", "rows_done": 8}))
    _extract(data, out)
    assert "starting over" in capsys.readouterr().out
    arrays, _ = _read(out / "train.h5")
    assert arrays["att"].shape[0] == 20


def test_imagenet_weights_are_read_from_the_torch_hub_cache(tmp_path, monkeypatch):
    """Offline nodes: `imagenet` loads the file a prefetch put in the hub cache, no download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    (tmp_path / "hub/checkpoints").mkdir(parents=True)
    torch.manual_seed(5)
    cached = torchvision.models.resnet18()
    torch.save(cached.state_dict(), tmp_path / "hub/checkpoints" / url.rsplit("/", 1)[1])
    backbone = create_backbone("resnet18", "imagenet")
    assert torch.equal(backbone.trunk[0].weight, cached.conv1.weight)


TIMM = {"swin_tiny_patch4_window7_224": (768, 2), "vit_tiny_patch16_224": (192, 4), "convnext_atto": (320, 2)}


@pytest.mark.parametrize("name", sorted(TIMM))
def test_timm_backbones_give_grids_at_the_images_size(name):
    backbone = create_backbone(name, "none", seed=0, image_size=64).eval()
    with torch.no_grad():
        grid = backbone(torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8))
    dim, side = TIMM[name]
    assert grid.shape == (2, dim, side, side) == (2, backbone.out_dim, side, side)
    assert len(backbone.stages()) >= 4  # stem + stages: what finetune_e2e's freeze_stages counts


def test_timm_weights_file_in_timm_layout(tmp_path):
    import timm

    torch.manual_seed(7)
    reference = timm.create_model("swin_tiny_patch4_window7_224", img_size=64).eval()  # with its classifier
    torch.save(reference.state_dict(), tmp_path / "swin.pth")
    backbone = create_backbone("swin_tiny_patch4_window7_224", str(tmp_path / "swin.pth"), image_size=64).eval()
    x = torch.rand(1, 3, 64, 64) * 255
    mean, std = (
        torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
    )
    with torch.no_grad():
        expected = reference.forward_features((x / 255 - mean) / std).permute(0, 3, 1, 2)
        assert torch.allclose(backbone(x), expected, atol=1e-4)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CaptionflowError, match="do not fit backbone swin_tiny"):
        create_backbone("swin_tiny_patch4_window7_224", str(tmp_path / "r18.pth"), image_size=64)


def test_timm_swin_features_feed_training_fine_tuning_and_regeneration(data, tmp_path):
    from captionflow.models import checkpoint
    from captionflow.training import e2e, xe

    outputs = _extract(data, tmp_path / "swin", backbone="swin_tiny_patch4_window7_224")
    arrays, attrs = _read(outputs["train"])
    assert arrays["att"].shape[1:] == (4, 768) and attrs["backbone"] == "swin_tiny_patch4_window7_224"
    cfg = build(xe.XEConfig, epochs=1, batch_size=8, device="cpu")
    xe.train(
        outputs["train"],
        outputs["val"],
        data / "labels.h5",
        data / "labels.json",
        data / "references.json",
        tmp_path / "model.pt",
        tmp_path / "history.tsv",
        "show_attend_tell",
        {"hidden_size": 32},
        cfg,
    )
    assert checkpoint.load(tmp_path / "model.pt")["model_args"]["feat_dim"] == 768
    # end-to-end fine-tuning of the Swin (patch embedding + first stage frozen), then regeneration
    out = tmp_path / "e2e"
    e2e.train(
        data / "labels.h5",
        data / "labels.json",
        data / "references.json",
        data / "manifest.json",
        tmp_path / "model.pt",
        out / "model.pt",
        out / "backbone.pth",
        out / "history.tsv",
        Backbone("swin_tiny_patch4_window7_224", "none", 0, 64, 0),
        build(e2e.E2EConfig, epochs=1, batch_size=4, freeze_stages=2, device="cpu"),
    )
    tuned = torch.load(out / "backbone.pth", weights_only=True)
    initial = create_backbone("swin_tiny_patch4_window7_224", "none", seed=0, image_size=64).state_dict()
    frozen, trained = "trunk.model.layers.0.blocks.0.mlp.fc1.weight", "trunk.model.layers.3.blocks.0.mlp.fc1.weight"
    assert torch.equal(tuned[frozen], initial[frozen]) and not torch.equal(tuned[trained], initial[trained])
    regenerated = _extract(
        data, tmp_path / "regen", backbone="swin_tiny_patch4_window7_224", weights=str(out / "backbone.pth")
    )
    assert not np.array_equal(_read(regenerated["val"])[0]["att"], _read(outputs["val"])[0]["att"])
