"""Stage resize_images: every listed image -> an RGB JPEG of a fixed size.

Safe with a caption file from anywhere: every image path must stay inside the images root
(lexically, after normalisation; `allow_outside_root` lifts this), and the copies are
named by the image's unique id (`<id>.jpg`), so they are written only below the resized
folder and `x.png` beside `x.jpg` gives two copies.

Resumable: images are written to a folder keyed by the resize settings, each through a
temporary file and a rename. Each copy carries, in its JPEG comment, the fingerprint of
the source it came from (resolved path, size, mtime_ns); a rerun keeps exactly the copies
whose fingerprint equals their source's and redoes the others. The declared outputs (a
manifest and the skip list) are written last.
"""

import hashlib
import json
import os
import struct
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from captionflow.data.karpathy import load_karpathy
from captionflow.errors import CaptionflowError
from captionflow.utils.io import atomic_path, file_stamp, write_json, write_text

RESIZE_MODES = ("crop", "exact")
BAD_IMAGE_POLICIES = ("fail", "skip")
MAX_PIXELS = 100_000_000  # default of resize.max_pixels (Pillow's own limit is ~89.5 M)
# File suffixes taken for images where a folder is searched (caption CLI, prepare).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_FINGERPRINT_TAG = b"captionflow source "
NOT_FOUND = "file not found"


def to_rgb(img):
    """Any PIL image -> RGB, keeping what a person sees.

    EXIF orientation is applied; 16-bit and 32-bit greyscale are rescaled to 8 bits
    (a plain convert() clips them to white or black), unless every sample is <= 255 (an
    8-bit image in a wider container keeps its values instead of turning black);
    transparency is composited on white (a plain convert() shows hidden pixels, often
    black); CMYK/palette/LA/L are converted.
    """
    img = ImageOps.exif_transpose(img)
    if img.mode in _SIXTEEN_BIT or img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if arr.max(initial=0) > 255:
            arr = arr / 257.0  # 0..65535 -> 0..255
        elif img.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0  # float images in [0, 1]
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB")


def source_fingerprint(src):
    """Identity of a source image: its resolved path, size and mtime_ns (bytes), or None
    when it cannot be stat'ed. Stored in each copy's JPEG comment."""
    try:
        st = os.stat(src)
    except (OSError, ValueError):
        return None
    real = os.fsencode(os.path.realpath(src))
    return _FINGERPRINT_TAG + real + f"\tsize={st.st_size}\tmtime_ns={st.st_mtime_ns}".encode()


def copy_fingerprint(dst):
    """The source fingerprint recorded in a resized copy, or None (missing, unreadable,
    or written before fingerprints)."""
    try:
        with Image.open(dst) as img:
            comment = img.info.get("comment")
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError):
        return None
    return comment if isinstance(comment, bytes) and comment.startswith(_FINGERPRINT_TAG) else None


def _open_decoded(src, size, max_pixels):
    """Open and decode `src` -> RGB image, or raise; more than `max_pixels` pixels is refused
    from the header alone, before any pixel is decoded (a decompression bomb)."""
    previous = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = None  # checked here, with the image's size in the reason
            img = Image.open(src)
            # Pillow's own checks (frames, tiles) apply the same limit from here on.
            Image.MAX_IMAGE_PIXELS = max_pixels
            with img:
                _check_pixels(img.size, max_pixels)
                if img.format == "JPEG":
                    img.draft("RGB", (size, size))  # DCT-domain downscale, still >= size
                img.load()  # decode now: truncated/corrupt data raises here
                return to_rgb(img)
    finally:
        Image.MAX_IMAGE_PIXELS = previous


class _TooManyPixels(Exception):
    pass


def _check_pixels(dims, max_pixels):
    width, height = dims
    if width * height > max_pixels:
        raise _TooManyPixels(
            f"{width} x {height} = {width * height} pixels, over resize.max_pixels {max_pixels} "
            "(a decompression bomb, or raise resize.max_pixels)"
        )


def fit_image(rgb, size, mode):
    """An RGB image -> `size` x `size`: mode "crop" scales the shorter side to `size` and
    keeps the centre square; "exact" squashes it (aspect ratio not kept)."""
    if mode == "crop":
        return ImageOps.fit(rgb, (size, size), method=Image.Resampling.BICUBIC)
    return rgb.resize((size, size), Image.Resampling.BICUBIC)


def read_resized(src, size, mode, max_pixels=MAX_PIXELS):
    """Decode image file `src` and resize it (fit_image) -> (image, None), or (None, the
    reason it cannot be read: missing, corrupt, truncated, too many pixels)."""
    try:
        rgb = _open_decoded(src, size, max_pixels)
    except FileNotFoundError:
        return None, NOT_FOUND
    except UnidentifiedImageError:
        return None, "not a readable image (empty or corrupt file)"
    except _TooManyPixels as exc:
        return None, str(exc)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, f"over resize.max_pixels {max_pixels} pixels (a decompression bomb, or raise resize.max_pixels)"
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        return None, f"cannot decode: {exc}"
    return fit_image(rgb, size, mode), None


def resize_one(src, dst, size, mode, quality, max_pixels=MAX_PIXELS, fingerprint=None):
    """Read `src`, convert to RGB, resize, write `dst` atomically. Returns None or a reason.

    mode "crop": shorter side to `size`, then the centre `size` x `size` square;
    mode "exact": straight to `size` x `size` (aspect ratio not kept).
    fingerprint: bytes stored as the JPEG comment (the source's, see source_fingerprint).
    """
    out, reason = read_resized(src, size, mode, max_pixels)
    if reason:
        return reason
    with atomic_path(dst) as tmp:
        out.save(tmp, format="JPEG", quality=quality, **({"comment": fingerprint} if fingerprint else {}))
    return None


def _resize_task(args):
    image_id, src, dst, size, mode, quality, max_pixels = args
    # Taken before the source is read: a source changed while it is read differs next time.
    fingerprint = source_fingerprint(src)
    if fingerprint is not None and copy_fingerprint(dst) == fingerprint:
        return image_id, src, None, fingerprint  # written from this very source by an earlier run
    return image_id, src, resize_one(src, dst, size, mode, quality, max_pixels, fingerprint), fingerprint


def resized_dir(base_dir, size, mode, quality):
    """Folder for images resized with these settings (so changed settings never reuse files)."""
    return Path(base_dir) / f"{mode}{size}_q{quality}"


def resized_name(image_id):
    """File name of an image's resized copy: its unique id, so no two sources share one."""
    return f"{image_id}.jpg"


def source_path(images_root, file_path):
    """The listed `filepath/filename` under `images_root`, normalised lexically (as given:
    relative stays relative). `a/../b` is read as `b`, whatever `a` links to."""
    return os.path.normpath(os.path.join(images_root, file_path))


def is_inside(images_root, path):
    """Whether `path` lies lexically below `images_root` (symlinked folders inside count)."""
    root = os.path.normpath(os.path.abspath(images_root))
    path = os.path.normpath(os.path.abspath(path))
    return path != root and os.path.commonpath([root, path]) == root


def check_inside_root(records, images_root, captions):
    """Refuse, in one line, the first record whose image path leaves `images_root`."""
    outside = [
        (i, rec) for i, rec in enumerate(records) if not is_inside(images_root, source_path(images_root, rec.file_path))
    ]
    if outside:
        i, rec = outside[0]
        more = f" (and {len(outside) - 1} more)" if len(outside) > 1 else ""
        raise CaptionflowError(
            f"captions file {captions}: images[{i}] (id {rec.id}, file {rec.file_path}) is outside "
            f"data.images_root {images_root}{more}; fix its filepath/filename, or set "
            "data.allow_outside_root: true to read images from outside the root"
        )


def listed_sources(captions, cache_dir=None):
    """The image paths (relative to the images root) a caption file lists, in its order.

    `captions`: a Karpathy-schema file, or CUHK-PEDES's reid_raw.json (a list of records
    with `file_path`). Parsing COCO's file (150 MB) takes seconds; with `cache_dir` the
    listing is kept there under a name keyed on the file's absolute path, size and
    mtime_ns, so that a DAG build reads a 5 MB list instead (any edit to the file changes
    its size or mtime). Older listings in `cache_dir` are removed; a cache that cannot be
    written is skipped. Raises on a file that cannot be read or has another shape.
    """
    key = hashlib.sha256(file_stamp(captions).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    cached = Path(cache_dir) / f"listing-{key}.json" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        try:
            with open(cached) as f:
                return json.load(f)
        except (OSError, ValueError):
            pass  # a damaged cache: read the caption file
    with open(captions, "rb") as f:
        doc = json.loads(f.read().decode("utf-8-sig"))
    if isinstance(doc, list):  # CUHK-PEDES
        listed = [record["file_path"] for record in doc]
    else:
        listed = [os.path.join(img.get("filepath") or "", img["filename"]) for img in doc["images"]]
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            for old in cached.parent.glob("listing-*.json"):
                old.unlink(missing_ok=True)
            write_json(cached, listed)
        except OSError:
            pass  # read-only or full: no cache, the next build parses the file again
    return listed


def sources_digest(captions, images_root, cache_dir=None):
    """Short hash over (relpath, size, mtime_ns) of every image the caption file lists.

    The workflow passes it as a param of resize_images, so an image changed in place (not a
    declared input) reruns the rule. `captions`: as `listed_sources` reads it (`cache_dir`:
    where it keeps the listing between DAG builds). Never raises: a caption file that
    cannot be read gets a fixed marker, and resize_images (or import_cuhk_pedes) reports
    the problem when it runs.
    """
    try:
        listed = listed_sources(captions, cache_dir)
    except Exception:  # noqa: BLE001 - any unreadable file: resize_images says what is wrong
        return "unreadable caption file"
    digest = hashlib.sha256()
    for rel in listed:
        try:
            st = os.stat(source_path(images_root, rel))
            entry = f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n"
        except (OSError, ValueError, TypeError):
            entry = f"{rel}\tmissing\n"
        digest.update(entry.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:16]


def _not_found_error(src, image_id, sources, images_root):
    found = sum(os.path.isfile(s) for s in sources)
    return CaptionflowError(
        f"image not found: {src} (id {image_id}); {found} of the {len(sources)} files the caption file "
        f"lists exist under data.images_root {images_root}: check data.images_root and the files"
    )


def resize_images(
    captions,
    images_root,
    image_base_dir,
    manifest,
    skipped,
    size,
    mode,
    quality,
    on_bad_image,
    threads,
    max_pixels=MAX_PIXELS,
    allow_outside_root=False,
):
    """Resize every image listed in the caption file.

    captions: Karpathy-schema JSON; images_root: folder its `filepath/filename` are under
        (a path leaving it is refused unless allow_outside_root; sources are only read).
    image_base_dir: resized images go to a settings-keyed folder below it, as `<id>.jpg`.
    manifest: JSON written last: {image_dir, size, mode, quality, sources, images: [{id,
        file_path}]}; a copy is image_dir/file_path; `sources` hashes the kept copies'
        source fingerprints.
    skipped: TSV of images dropped under on_bad_image="skip" (header only when none).
    max_pixels: an image with more pixels is a bad image (checked from its header).
    """
    if mode not in RESIZE_MODES:
        raise CaptionflowError(f"resize mode {mode!r} is not one of {RESIZE_MODES}")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise CaptionflowError(f"on_bad_image {on_bad_image!r} is not one of {BAD_IMAGE_POLICIES}")
    records = load_karpathy(captions)
    if not allow_outside_root:
        check_inside_root(records, images_root, captions)
    out_dir = resized_dir(image_base_dir, size, mode, quality)
    sources = [source_path(images_root, rec.file_path) for rec in records]
    tasks = [
        (rec.id, src, str(out_dir / resized_name(rec.id)), size, mode, quality, max_pixels)
        for rec, src in zip(records, sources)
    ]

    bad, digest = {}, hashlib.sha256()
    pool = ProcessPoolExecutor(threads) if threads > 1 else None
    try:
        results = pool.map(_resize_task, tasks, chunksize=16) if pool else map(_resize_task, tasks)
        for image_id, src, reason, fingerprint in tqdm(results, total=len(tasks), desc="resize_images", unit="img"):
            if reason is None:
                digest.update(f"{image_id}\t".encode() + (fingerprint or b"?") + b"\n")
                continue
            if on_bad_image == "fail":
                if reason == NOT_FOUND:
                    raise _not_found_error(src, image_id, sources, images_root)
                raise CaptionflowError(
                    f"bad image {src} (id {image_id}): {reason} "
                    "(set resize.on_bad_image: skip to drop it from every split)"
                )
            print(f"skipping bad image {src} (id {image_id}): {reason}", flush=True)
            bad[image_id] = (src, reason)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)

    missing = sum(reason == NOT_FOUND for _, reason in bad.values())
    if missing:
        print(f"{missing} of the {len(records)} listed images are not under data.images_root {images_root}", flush=True)
    kept = [{"id": rec.id, "file_path": resized_name(rec.id)} for rec in records if rec.id not in bad]
    if not kept:
        raise CaptionflowError(f"no readable image among the {len(records)} listed in {captions}")
    lines = ["id\tfile\treason"] + [f"{i}\t{src}\t{reason}" for i, (src, reason) in bad.items()]
    write_text(skipped, "\n".join(lines) + "\n")
    write_json(
        manifest,
        {
            "image_dir": str(out_dir),
            "size": size,
            "mode": mode,
            "quality": quality,
            "sources": digest.hexdigest()[:16],  # changes whenever a kept copy's source does
            "images": kept,
        },
    )
    print(f"resized {len(kept)} images into {out_dir}; skipped {len(bad)}", flush=True)
