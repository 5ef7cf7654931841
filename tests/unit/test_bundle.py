"""Bundles (captionflow/deploy): written with everything needed to caption, read back with
weights_only, refused in one line when damaged or foreign; the Python API and the CLI."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

import captionflow
from captionflow.cli import main
from captionflow.data.captions import read_labels_json
from captionflow.decoding.ensemble import Ensemble, member_feats
from captionflow.decoding.search import beam_search
from captionflow.deploy.bundle import FORMAT_VERSION, export_ensemble, load_bundle
from captionflow.errors import CaptionflowError
from captionflow.models import checkpoint, create_model
from tests.unit.conftest import DECODING, _checkpoint, _export, _test_images


def test_a_bundle_is_self_contained_and_loads_with_weights_only(bundle, tiny_data):
    raw = torch.load(bundle / "bundle.pt", weights_only=True)  # tensors, dicts, strings, numbers only
    assert raw["version"] == FORMAT_VERSION and raw["model"]["name"] == "fc"
    assert raw["backbone"]["name"] == "resnet18" and raw["backbone"]["image_size"] == 64
    assert raw["preprocess"] == {"resize_mode": "crop", "size": 64, "jpeg_quality": 95, "feature_dtype": "float32"}
    assert raw["vocabulary"]["ix_to_word"] == read_labels_json(tiny_data / "labels.json")["ix_to_word"]
    assert raw["decoding"] == DECODING and raw["provenance"]["stages"] == ["xe"]
    card = json.loads((bundle / "bundle.json").read_text())
    assert "weights" not in json.dumps(card) and card["model"]["name"] == "fc"


def test_the_bundle_reproduces_the_feature_files(bundle, tiny_data):
    """The backbone and preprocessing of the bundle give the features extraction wrote."""
    import h5py

    captioner = captionflow.load(bundle, device="cpu")
    member = captioner.members[0]
    paths = _test_images(tiny_data)
    feats = member.feats(torch.stack([captioner.images(p)[member.preprocess] for p in paths]))
    with h5py.File(tiny_data / "test.h5") as f:
        torch.testing.assert_close(feats["att"], torch.from_numpy(f["att"][()]), atol=1e-5, rtol=1e-5)
    # a PIL image of a file the resize stage did not shrink in the DCT domain gives the same pixels
    with Image.open(paths[0]) as img:
        assert torch.equal(captioner.images(img)[member.preprocess], captioner.images(paths[0])[member.preprocess])


def test_a_version_2_bundle_still_loads_its_grid_size_named_att_size(bundle, tiny_data, tmp_path):
    # version 2 called the backbone's grid size att_size; pooled to 1 x 1 here, so that a
    # reader that ignored it would give the native 2 x 2 grid (and refuse the bundle)
    raw = torch.load(bundle / "bundle.pt", weights_only=True)
    raw["version"], raw["features"]["regions"] = 2, 1
    raw["backbone"]["att_size"] = 1
    del raw["backbone"]["grid_size"]
    torch.save(raw, tmp_path / "v2.pt")
    member = captionflow.load(tmp_path / "v2.pt", device="cpu").members[0]
    images = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    assert member.feats(images)["att"].shape == (2, 1, 512)


def test_python_api_captions_paths_and_pil_images(bundle, tiny_data):
    captioner = captionflow.load(bundle, device="cpu")
    paths = _test_images(tiny_data)[:3]
    captions = captioner.caption(paths)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    with Image.open(paths[0]) as img:
        assert captioner.caption(img) == captions[0]
    assert captioner.caption(paths, beam_size=1) == captioner.caption(paths, beam_size=1, batch_size=1)


def test_an_ensemble_of_one_model_twice_decodes_as_the_model(tiny_data):
    torch.manual_seed(0)
    model = create_model("fc", vocab_size=20, feat_dim=12, embed_size=8, hidden_size=16).eval()
    other = create_model(
        "show_attend_tell", vocab_size=20, feat_dim=12, embed_size=8, hidden_size=16, att_size=8
    ).eval()
    att = torch.randn(4, 5, 12)
    feats = {"att": att, "fc": att.mean(1)}
    alone, _ = beam_search(model, feats, beam_size=3, max_len=6)
    twice, _ = beam_search(Ensemble([model, model]), member_feats([feats, feats]), beam_size=3, max_len=6)
    assert torch.equal(alone, twice)
    # the control: a second, different member changes the distribution
    lp_alone, _ = model.step(torch.zeros(4, dtype=torch.long), model.init_state(feats))
    ensemble = Ensemble([model, other])
    lp_mixed, _ = ensemble.step(torch.zeros(4, dtype=torch.long), ensemble.init_state(member_feats([feats, feats])))
    assert not torch.allclose(lp_alone, lp_mixed, atol=1e-3)
    torch.testing.assert_close(lp_mixed.exp().sum(dim=1), torch.ones(4))  # renormalised


def test_ensemble_bundle_holds_its_members(bundle, tiny_data, tmp_path):
    _checkpoint(tiny_data, tmp_path / "b.pt", seed=1, embed_size=16, hidden_size=32)
    second = _export(tiny_data, tmp_path / "b", tmp_path / "b.pt")
    out = tmp_path / "ens"
    export_ensemble(
        [bundle / "bundle.pt", second / "bundle.pt"],
        None,
        DECODING,
        "ens",
        "0" * 64,
        out / "bundle.pt",
        out / "bundle.json",
    )
    captioner = captionflow.load(out, device="cpu")
    assert len(captioner.members) == 2 and isinstance(captioner.model, Ensemble)
    assert len(captioner.caption(_test_images(tiny_data)[:2])) == 2
    with pytest.raises(CaptionflowError, match="is an ensemble itself"):
        export_ensemble(
            [out / "bundle.pt", bundle / "bundle.pt"],
            None,
            DECODING,
            "e2",
            "0" * 64,
            tmp_path / "x.pt",
            tmp_path / "x.json",
        )


def _one_line(exc):
    return "\n" not in str(exc.value) and "Traceback" not in str(exc.value)


def test_damaged_foreign_and_newer_bundles_are_refused_in_one_line(bundle, tmp_path):
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes((bundle / "bundle.pt").read_bytes()[:5000])
    with pytest.raises(CaptionflowError, match="cannot be read: it is empty, truncated") as exc:
        load_bundle(damaged)
    assert _one_line(exc)
    newer = torch.load(bundle / "bundle.pt", weights_only=True)
    newer["version"] = FORMAT_VERSION + 1
    torch.save(newer, tmp_path / "newer.pt")
    with pytest.raises(
        CaptionflowError,
        match=f"format version {FORMAT_VERSION + 1}, and this captionflow reads versions up to {FORMAT_VERSION}",
    ) as exc:
        load_bundle(tmp_path / "newer.pt")
    assert _one_line(exc)
    torch.save({"model": {}, "model_name": "fc"}, tmp_path / "model.pt")  # a checkpoint, not a bundle
    with pytest.raises(CaptionflowError, match="is not a captionflow bundle"):
        load_bundle(tmp_path / "model.pt")
    with pytest.raises(CaptionflowError, match="does not exist"):
        load_bundle(tmp_path / "missing.pt")


def test_a_checkpoint_with_nan_weights_is_not_exported(tiny_data, tmp_path):
    model = _checkpoint(tiny_data, tmp_path / "model.pt", embed_size=16, hidden_size=32)
    state = checkpoint.load(tmp_path / "model.pt")
    state["model"]["logit.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(CaptionflowError, match="holds NaN or inf"):
        _export(tiny_data, tmp_path / "export", tmp_path / "model.pt")
    assert not (tmp_path / "export/bundle.pt").exists()
    del model


def test_region_feature_bundles_say_they_cannot_caption_raw_images(bundle, tmp_path, tiny_data):
    raw = torch.load(bundle / "bundle.pt", weights_only=True)
    raw["backbone"], raw["features"] = None, {"source": "bottomup_tsv"}
    torch.save(raw, tmp_path / "regions.pt")
    with pytest.raises(CaptionflowError, match="reads bottomup_tsv region features, which captionflow cannot compute"):
        captionflow.load(tmp_path / "regions.pt", device="cpu").caption(_test_images(tiny_data)[0])


def test_cli_formats_and_errors(bundle, tiny_data, tmp_path, capsys):
    paths = [str(p) for p in _test_images(tiny_data)[:2]]
    assert (
        main(["caption", *paths, "--model", str(bundle), "--format", "coco", "-o", str(tmp_path / "r.json"), "-q"]) == 0
    )
    records = json.loads((tmp_path / "r.json").read_text())
    assert [r["file_path"] for r in records] == paths and {"image_id", "caption", "file_path"} == set(records[0])
    assert main(["caption", paths[0], "--model", str(bundle), "-q"]) == 0
    assert capsys.readouterr().out.startswith(paths[0] + "\t")
    assert main(["caption", paths[0], "--model", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bundle" in err[0] and "does not exist" in err[0]
    assert main(["caption", str(tmp_path / "none.jpg"), "--model", str(bundle)]) == 2  # a typo: refused before any work
    assert "none.jpg: no such file or folder" in capsys.readouterr().err
    proc = subprocess.run(
        [sys.executable, "-m", "captionflow.cli", "caption", paths[0], "--model", str(bundle), "--beam-size", "0"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "argument --beam-size: must be an integer of at least 1" in proc.stderr
