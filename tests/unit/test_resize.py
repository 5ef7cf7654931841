"""resize_images: colour modes, orientation, crop/exact, bad images, resumability."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from captionflow.data.resize import resize_images, resize_one, to_rgb
from captionflow.errors import CaptionflowError


def _rgb(img):
    return np.asarray(to_rgb(img), dtype=float)


def test_grayscale_cmyk_palette_become_rgb():
    gray = Image.new("L", (8, 8), 100)
    assert np.allclose(_rgb(gray), 100)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    assert np.allclose(_rgb(cmyk)[0, 0], [255, 0, 0], atol=2)
    pal = Image.new("RGB", (8, 8), (10, 200, 30)).quantize(4)
    assert pal.mode == "P"
    assert np.allclose(_rgb(pal)[0, 0], [10, 200, 30], atol=8)


def test_sixteen_bit_is_rescaled_not_clipped(tmp_path):
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as img:
        assert img.mode.startswith("I")
        out = _rgb(img)
    assert out.shape == (64, 64, 3)
    assert abs(out.mean() - 127.5) < 2  # a plain convert() gives ~255 (all white)
    assert out.min() == 0 and out.max() == 255
    as_int32 = Image.fromarray(ramp.astype(np.int32))
    assert abs(_rgb(as_int32).mean() - 127.5) < 2


def test_alpha_is_composited_on_white_not_black():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black pixels
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    out = _rgb(rgba)
    assert np.allclose(out[0, 0], [255, 0, 0])
    assert np.allclose(out[4, 4], 255)  # transparent -> white
    la = Image.new("LA", (8, 8), (0, 0))
    assert np.allclose(_rgb(la), 255)
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 200, 0, 0])
    pal.info["transparency"] = 0
    assert np.allclose(_rgb(pal), 255)


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:, :30] = 255  # left half white, as stored
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "o.jpg", exif=exif)
    with Image.open(tmp_path / "o.jpg") as stored:
        out = _rgb(stored)
    assert out.shape == (60, 40, 3)  # displayed portrait
    assert out[:30].mean() > 200 and out[30:].mean() < 50  # white half now on top


def test_crop_and_exact_modes(tmp_path):
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :50] = (0, 0, 255)  # blue outer quarters
    arr[:, 150:] = (0, 0, 255)
    arr[:, 50:150] = (255, 0, 0)  # red centre square
    Image.fromarray(arr).save(tmp_path / "wide.png")
    assert resize_one(tmp_path / "wide.png", tmp_path / "c.jpg", 32, "crop", 95) is None
    assert resize_one(tmp_path / "wide.png", tmp_path / "e.jpg", 32, "exact", 95) is None
    crop = np.asarray(Image.open(tmp_path / "c.jpg"), dtype=float)
    exact = np.asarray(Image.open(tmp_path / "e.jpg"), dtype=float)
    assert crop.shape == exact.shape == (32, 32, 3)
    assert crop[:, :, 0].mean() > 230 and crop[:, :, 2].mean() < 25  # only the red centre
    assert exact[:, 1, 2] .mean() > 200 and exact[:, 16, 0].mean() > 200  # blue edges kept


def _dataset(tmp_path, n=6):
    root = tmp_path / "images"
    (root / "train2014").mkdir(parents=True)
    images = []
    for i in range(n):
        Image.new("RGB", (50 + i, 40), (20 * i, 100, 50)).save(root / "train2014" / f"{i}.png")
        images.append(
            {
                "filepath": "train2014",
                "filename": f"{i}.png",
                "imgid": i,
                "cocoid": 100 + i,
                "split": "train",
                "sentences": [{"tokens": ["a", "thing"]}],
            }
        )
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"images": images}))
    return captions, root


def _run(tmp_path, captions, root, policy="fail", threads=1):
    out = tmp_path / "out"
    resize_images(
        captions=captions,
        images_root=root,
        image_base_dir=out / "resized",
        manifest=out / "manifest.json",
        skipped=out / "skipped.tsv",
        size=32,
        mode="crop",
        quality=90,
        on_bad_image=policy,
        threads=threads,
    )
    return out


def _corrupt(root, kind):
    path = root / "train2014" / "2.png"
    if kind == "zero":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(os.urandom(500))
    elif kind == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:3000])
    elif kind == "missing":
        path.unlink()
    return path


@pytest.mark.parametrize("kind", ["zero", "garbage", "truncated", "missing"])
def test_bad_image_fail_is_one_line_and_writes_no_outputs(tmp_path, kind):
    captions, root = _dataset(tmp_path)
    bad = _corrupt(root, kind)
    with pytest.raises(CaptionflowError) as err:
        _run(tmp_path, captions, root)
    message = str(err.value)
    assert str(bad) in message and "id 102" in message and "\n" not in message
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not (tmp_path / "out" / "skipped.tsv").exists()


@pytest.mark.parametrize("kind", ["zero", "truncated"])
def test_bad_image_skip_drops_and_lists_it(tmp_path, kind):
    captions, root = _dataset(tmp_path)
    bad = _corrupt(root, kind)
    out = _run(tmp_path, captions, root, policy="skip", threads=2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [img["id"] for img in manifest["images"]] == [100, 101, 103, 104, 105]
    rows = list(csv.DictReader(open(out / "skipped.tsv"), delimiter="\t"))
    assert [(r["id"], r["file"]) for r in rows] == [("102", str(bad))]
    assert rows[0]["reason"]


def test_outputs_and_resume_do_only_what_is_missing(tmp_path):
    captions, root = _dataset(tmp_path)
    out = _run(tmp_path, captions, root, threads=2)
    manifest = json.loads((out / "manifest.json").read_text())
    files = [os.path.join(manifest["image_dir"], img["file_path"]) for img in manifest["images"]]
    for f in files:
        with Image.open(f) as img:
            assert img.size == (32, 32) and img.mode == "RGB"
    # A "killed" run: one output missing, the others done earlier.
    os.unlink(files[3])
    mtimes = {f: os.stat(f).st_mtime_ns for f in files if os.path.exists(f)}
    (out / "manifest.json").unlink()
    _run(tmp_path, captions, root)
    assert os.path.exists(files[3])
    assert all(os.stat(f).st_mtime_ns == t for f, t in mtimes.items())
    leftovers = [p for p in (out / "resized").rglob("*") if ".tmp-" in p.name]
    assert leftovers == []
