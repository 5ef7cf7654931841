"""Stage resize_images: every listed image -> an RGB JPEG of a fixed size.

Resumable: images are written to a folder keyed by the resize settings, each through a
temporary file and a rename, and a rerun only does the images that are missing. The
declared outputs (a manifest and the skip list) are written last.
"""

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from captionflow.data.karpathy import load_karpathy
from captionflow.errors import CaptionflowError
from captionflow.utils.io import atomic_path, write_json, write_text

RESIZE_MODES = ("crop", "exact")
BAD_IMAGE_POLICIES = ("fail", "skip")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(img):
    """Any PIL image -> RGB, keeping what a person sees.

    EXIF orientation is applied; 16-bit and 32-bit greyscale are rescaled to 8 bits
    (a plain convert() clips them to white or black); transparency is composited on white
    (a plain convert() shows hidden pixels, often black); CMYK/palette/LA/L are converted.
    """
    img = ImageOps.exif_transpose(img)
    if img.mode in _SIXTEEN_BIT or img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode in _SIXTEEN_BIT or arr.max(initial=0) > 255:
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


def resize_one(src, dst, size, mode, quality):
    """Read `src`, convert to RGB, resize, write `dst` atomically. Returns None or a reason.

    mode "crop": shorter side to `size`, then the centre `size` x `size` square;
    mode "exact": straight to `size` x `size` (aspect ratio not kept).
    """
    try:
        with Image.open(src) as img:
            if img.format == "JPEG":
                img.draft("RGB", (size, size))  # DCT-domain downscale, still >= size
            img.load()  # decode now: truncated/corrupt data raises here
            rgb = to_rgb(img)
    except FileNotFoundError:
        return "file not found"
    except UnidentifiedImageError:
        return "not a readable image (empty or corrupt file)"
    except (OSError, ValueError, SyntaxError) as exc:
        return f"cannot decode: {exc}"
    if mode == "crop":
        out = ImageOps.fit(rgb, (size, size), method=Image.Resampling.BICUBIC)
    else:
        out = rgb.resize((size, size), Image.Resampling.BICUBIC)
    with atomic_path(dst) as tmp:
        out.save(tmp, format="JPEG", quality=quality)
    return None


def _resize_task(args):
    image_id, src, dst, size, mode, quality = args
    try:  # done by an earlier (killed) run, and the source has not changed since?
        if os.path.getmtime(dst) >= os.path.getmtime(src):
            return image_id, src, None
    except OSError:
        pass
    return image_id, src, resize_one(src, dst, size, mode, quality)


def resized_dir(base_dir, size, mode, quality):
    """Folder for images resized with these settings (so changed settings never reuse files)."""
    return Path(base_dir) / f"{mode}{size}_q{quality}"


def resize_images(captions, images_root, image_base_dir, manifest, skipped, size, mode, quality, on_bad_image, threads):
    """Resize every image listed in the caption file.

    captions: Karpathy-schema JSON; images_root: folder its `filepath/filename` are under.
    image_base_dir: resized images go to a settings-keyed folder below it.
    manifest: JSON written last: {image_dir, size, mode, images: [{id, file_path}]}.
    skipped: TSV of images dropped under on_bad_image="skip" (header only when none).
    """
    if mode not in RESIZE_MODES:
        raise CaptionflowError(f"resize mode {mode!r} is not one of {RESIZE_MODES}")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise CaptionflowError(f"on_bad_image {on_bad_image!r} is not one of {BAD_IMAGE_POLICIES}")
    records = load_karpathy(captions)
    out_dir = resized_dir(image_base_dir, size, mode, quality)
    tasks = []
    for rec in records:
        dst = out_dir / Path(rec.file_path).with_suffix(".jpg")
        tasks.append((rec.id, str(Path(images_root) / rec.file_path), str(dst), size, mode, quality))

    bad = {}
    pool = ProcessPoolExecutor(threads) if threads > 1 else None
    try:
        results = pool.map(_resize_task, tasks, chunksize=16) if pool else map(_resize_task, tasks)
        for image_id, src, reason in tqdm(results, total=len(tasks), desc="resize_images", unit="img"):
            if reason is None:
                continue
            if on_bad_image == "fail":
                raise CaptionflowError(
                    f"bad image {src} (id {image_id}): {reason} "
                    "(set on_bad_image: skip to drop it from every split)"
                )
            print(f"skipping bad image {src} (id {image_id}): {reason}", flush=True)
            bad[image_id] = (src, reason)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)

    kept = [
        {"id": rec.id, "file_path": str(Path(rec.file_path).with_suffix(".jpg"))} for rec in records if rec.id not in bad
    ]
    if not kept:
        raise CaptionflowError(f"no readable image among the {len(records)} listed in {captions}")
    lines = ["id\tfile\treason"] + [f"{i}\t{src}\t{reason}" for i, (src, reason) in bad.items()]
    write_text(skipped, "\n".join(lines) + "\n")
    write_json(
        manifest,
        {"image_dir": str(out_dir), "size": size, "mode": mode, "quality": quality, "images": kept},
    )
    print(f"resized {len(kept)} images into {out_dir}; skipped {len(bad)}", flush=True)
