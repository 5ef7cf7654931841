"""resize_images: colour modes, orientation, crop/exact, bad images, resumability, and
input safety (contained paths, unique copies, source fingerprints, decompression bombs)."""

import csv
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captionflow.data.resize import listed_sources, resize_images, resize_one, sources_digest, to_rgb
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
    assert exact[:, 1, 2].mean() > 200 and exact[:, 16, 0].mean() > 200  # blue edges kept


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
    leftovers = [p for p in (out / "resized").rglob("*") if ".tmp" in p.name]
    assert leftovers == []


# --- input safety: contained paths, unique copies, fingerprints, bombs, 16-bit ------------


def _png_header_only(path, width, height):
    """A PNG whose header declares width x height pixels, with almost no pixel data."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def _with_paths(captions, paths):
    """Rewrite the caption file so images[i] lists paths[i] (filepath, filename)."""
    data = json.loads(captions.read_text())
    for img, (filepath, filename) in zip(data["images"], paths):
        img["filepath"], img["filename"] = filepath, filename
    captions.write_text(json.dumps(data))


def _snapshot(folder):
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in Path(folder).rglob("*") if p.is_file()}


@pytest.mark.parametrize("escape", ["dotdot", "absolute"])
def test_paths_outside_the_root_are_refused_in_one_line(tmp_path, escape):
    captions, root = _dataset(tmp_path)
    outside = tmp_path / "private"
    outside.mkdir()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(outside / "secret.png")
    (outside / "secret.jpg").write_bytes(b"the user's own file")  # where the old code wrote
    listed = "../private/secret.png" if escape == "dotdot" else str(outside / "secret.png")
    _with_paths(captions, [("train2014", f"{i}.png") for i in range(3)] + [("", listed)])
    before = _snapshot(outside)
    with pytest.raises(CaptionflowError) as err:
        _run(tmp_path, captions, root)
    message = str(err.value)
    assert f"images[3] (id 103, file {listed}) is outside data.images_root" in message
    assert "data.allow_outside_root" in message and "\n" not in message
    assert not (tmp_path / "out").exists()  # refused before anything is written
    assert _snapshot(outside) == before


def test_outside_paths_when_allowed_are_only_read(tmp_path):
    captions, root = _dataset(tmp_path)
    outside = tmp_path / "private"
    outside.mkdir()
    Image.new("RGB", (40, 40), (250, 0, 0)).save(outside / "secret.png")
    (outside / "secret.jpg").write_bytes(b"the user's own file")
    _with_paths(captions, [("train2014", "0.png"), ("", "../private/secret.png"), ("", str(outside / "secret.png"))])
    before_outside, before_root = _snapshot(outside), _snapshot(root)
    out = tmp_path / "out"
    resize_images(
        captions,
        root,
        out / "resized",
        out / "manifest.json",
        out / "skipped.tsv",
        32,
        "crop",
        90,
        "fail",
        1,
        allow_outside_root=True,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert [img["file_path"] for img in manifest["images"]][:3] == ["100.jpg", "101.jpg", "102.jpg"]
    copy = np.asarray(Image.open(os.path.join(manifest["image_dir"], "101.jpg")), dtype=float)
    assert copy[..., 0].mean() > 200  # the red outside image was read
    assert _snapshot(outside) == before_outside and _snapshot(root) == before_root
    written = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    assert all(p.parts[0] in ("resized", "manifest.json", "skipped.tsv") for p in written)


def test_symlinked_folder_inside_the_root_is_fine(tmp_path):
    captions, root = _dataset(tmp_path)
    elsewhere = tmp_path / "disk2"
    (root / "train2014").rename(elsewhere)
    (root / "train2014").symlink_to(elsewhere, target_is_directory=True)
    out = _run(tmp_path, captions, root)
    assert len(json.loads((out / "manifest.json").read_text())["images"]) == 6


def test_same_stem_different_extension_gives_two_copies(tmp_path):
    captions, root = _dataset(tmp_path, n=2)
    Image.new("RGB", (40, 40), (255, 0, 0)).save(root / "train2014" / "x.png")
    Image.new("RGB", (40, 40), (0, 0, 255)).save(root / "train2014" / "x.jpg")
    _with_paths(captions, [("train2014", "x.png"), ("train2014", "x.jpg")])
    out = _run(tmp_path, captions, root)
    manifest = json.loads((out / "manifest.json").read_text())
    files = [os.path.join(manifest["image_dir"], img["file_path"]) for img in manifest["images"]]
    assert len(set(files)) == 2
    red, blue = (np.asarray(Image.open(f), dtype=float).mean(axis=(0, 1)) for f in files)
    assert red[0] > 200 and red[2] < 50 and blue[2] > 200 and blue[0] < 50


def _copies(out):
    manifest = json.loads((out / "manifest.json").read_text())
    return {img["id"]: os.path.join(manifest["image_dir"], img["file_path"]) for img in manifest["images"]}


def test_a_copy_is_redone_when_its_source_changes_even_to_an_older_mtime(tmp_path):
    captions, root = _dataset(tmp_path)
    out = _run(tmp_path, captions, root)
    copies = _copies(out)
    first = {i: (Path(f).read_bytes(), os.stat(f).st_mtime_ns) for i, f in copies.items()}
    digest = json.loads((out / "manifest.json").read_text())["sources"]
    # Another image under the same name, with an mtime older than the copy's.
    src = root / "train2014" / "2.png"
    Image.new("RGB", (50, 40), (255, 255, 255)).save(src)
    old = os.stat(copies[102]).st_mtime_ns - 10**10
    os.utime(src, ns=(old, old))
    out = _run(tmp_path, captions, root)
    assert Path(copies[102]).read_bytes() != first[102][0]
    assert np.asarray(Image.open(copies[102]), dtype=float).mean() > 240  # the new, white image
    for i, f in copies.items():  # only that one was redone
        if i != 102:
            assert os.stat(f).st_mtime_ns == first[i][1]
    assert json.loads((out / "manifest.json").read_text())["sources"] != digest


def test_a_copy_not_from_this_source_is_never_trusted(tmp_path):
    captions, root = _dataset(tmp_path)
    out = _run(tmp_path, captions, root)
    copies = _copies(out)
    # A same-named folder of other images (another images_root): every copy is redone.
    other = tmp_path / "other"
    (other / "train2014").mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (50, 40), (0, 0, 250)).save(other / "train2014" / f"{i}.png")
    _run(tmp_path, captions, other)
    assert all(np.asarray(Image.open(f), dtype=float)[..., 2].mean() > 200 for f in copies.values())
    # A foreign JPEG newer than its source at a copy's path (the old mtime rule trusted it).
    Image.new("RGB", (32, 32), (0, 255, 0)).save(copies[101])
    _run(tmp_path, captions, other)
    assert np.asarray(Image.open(copies[101]), dtype=float)[..., 1].mean() < 50


def test_sources_digest_follows_the_listed_images(tmp_path):
    captions, root = _dataset(tmp_path)
    digest = sources_digest(captions, root)
    assert sources_digest(captions, root) == digest  # stable
    src = root / "train2014" / "4.png"
    st = os.stat(src)
    Image.new("RGB", (50, 40), (9, 9, 9)).save(src)  # same name, other bytes, older mtime
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))
    assert sources_digest(captions, root) != digest
    (root / "train2014" / "unlisted.png").write_bytes(b"x")
    changed = sources_digest(captions, root)
    assert sources_digest(captions, root) == changed  # unlisted files do not count
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff not json")
    assert sources_digest(bad, root) == "unreadable caption file"


def test_decompression_bomb_is_a_bad_image(tmp_path):
    captions, root = _dataset(tmp_path)
    bomb = root / "train2014" / "3.png"
    _png_header_only(bomb, 30000, 30000)  # 900 M pixels: Pillow's DecompressionBombError
    with pytest.raises(CaptionflowError) as err:
        _run(tmp_path, captions, root)
    message = str(err.value)
    assert str(bomb) in message and "id 103" in message and "resize.max_pixels" in message and "\n" not in message
    out = _run(tmp_path, captions, root, policy="skip", threads=2)
    assert 103 not in _copies(out)
    rows = list(csv.DictReader(open(out / "skipped.tsv"), delimiter="\t"))
    assert [(r["id"], r["file"]) for r in rows] == [("103", str(bomb))]
    assert "30000 x 30000" in rows[0]["reason"]


def test_max_pixels_is_the_limit_not_pillows_default(tmp_path, monkeypatch):
    captions, root = _dataset(tmp_path)  # images of 50..55 x 40 pixels
    out = tmp_path / "out"
    args = (captions, root, out / "resized", out / "manifest.json", out / "skipped.tsv", 32, "crop", 90, "skip", 1)
    resize_images(*args, max_pixels=50 * 40 + 40)  # 50x40 and 51x40 fit, the rest is over
    assert sorted(_copies(out)) == [100, 101]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a stricter process-wide default...
    resize_images(*args, max_pixels=10_000)  # ...does not override the configured limit
    assert len(_copies(out)) == 6
    assert Image.MAX_IMAGE_PIXELS == 100  # and is left as it was


def test_eight_bit_values_in_a_sixteen_bit_container_are_kept(tmp_path):
    ramp = np.linspace(0, 255, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as img:
        assert img.mode.startswith("I;16")
        out = _rgb(img)
    assert np.abs(out[..., 0] - ramp).max() <= 1  # not divided by 257 (all black)
    for mode in ("I;16", "I;16B"):
        img = Image.new(mode, (4, 4), 200)
        assert np.allclose(_rgb(img), 200)


def test_missing_images_name_the_images_root_and_how_many_exist(tmp_path):
    captions, root = _dataset(tmp_path)
    (root / "train2014" / "1.png").unlink()
    (root / "train2014" / "4.png").unlink()
    with pytest.raises(CaptionflowError) as err:
        _run(tmp_path, captions, root)
    message = str(err.value)
    assert "image not found" in message and "id 101" in message
    assert f"4 of the 6 files the caption file lists exist under data.images_root {root}" in message
    assert "on_bad_image" not in message
    wrong = tmp_path / "nowhere"
    with pytest.raises(
        CaptionflowError, match=f"0 of the 6 files the caption file lists exist under data.images_root {wrong}"
    ):
        _run(tmp_path, captions, wrong)


def test_sources_listing_is_cached_and_follows_the_caption_file(tmp_path):
    """At COCO's size parsing the caption file is most of a DAG build: the listing is kept
    in a cache keyed on the file's path, size and mtime, and an edited file is read again."""
    captions, root = _dataset(tmp_path)
    cache = tmp_path / "cache"
    digest = sources_digest(captions, root, cache_dir=cache)
    assert digest == sources_digest(captions, root)  # the cache does not change the digest
    (cached,) = cache.glob("listing-*.json")
    assert json.loads(cached.read_text()) == [f"train2014/{i}.png" for i in range(6)]
    # the cache is what a second build reads: a listing planted in it is used
    cached.write_text(json.dumps(["train2014/0.png"]))
    assert listed_sources(captions, cache) == ["train2014/0.png"]
    # an edited caption file (another size or mtime) is parsed again, the old listing removed
    doc = json.loads(captions.read_text())
    doc["images"] = doc["images"][:4]
    captions.write_text(json.dumps(doc))
    assert listed_sources(captions, cache) == [f"train2014/{i}.png" for i in range(4)]
    assert len(list(cache.glob("listing-*.json"))) == 1
    assert sources_digest(captions, root, cache_dir=cache) == sources_digest(captions, root)
    # a damaged cache is ignored; a cache that cannot be written is skipped
    (cached,) = cache.glob("listing-*.json")
    cached.write_text("{not json")
    assert listed_sources(captions, cache) == [f"train2014/{i}.png" for i in range(4)]
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    assert listed_sources(captions, blocked / "cache") == [f"train2014/{i}.png" for i in range(4)]
