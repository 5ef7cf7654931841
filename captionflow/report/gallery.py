"""The caption gallery: test images with each stage's caption and two references.

One self-contained HTML page per experiment (thumbnails embedded as base64 JPEG), so the
report (and the file alone) shows what the captioner writes for which image.
"""

import base64
import html
import io
import json
from pathlib import Path

from PIL import Image

from captionflow.data.captions import read_labels_json
from captionflow.errors import CaptionflowError
from captionflow.utils.io import write_text

THUMBNAIL = 160  # longest side in pixels
REFERENCES = 2  # references shown per image


def first_images(labels_json, split, n):
    """The ids of the first `n` images of `split`, in the labels JSON's order (the
    gallery's images; the attention maps are drawn for the first few of them)."""
    ids = [img["id"] for img in read_labels_json(labels_json)["images"] if img["split"] == split]
    if not ids:
        raise CaptionflowError(f"split {split!r} has no images in {labels_json}")
    return ids[:n]


def image_files(manifest):
    """{image id: path of its resized copy} from resize_images' manifest."""
    with open(manifest) as f:
        m = json.load(f)
    return {img["id"]: Path(m["image_dir"]) / img["file_path"] for img in m["images"]}


def thumbnail_uri(path, side=THUMBNAIL):
    """A data: URI of a JPEG thumbnail of the image at `path`."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((side, side))
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=85)
    except OSError as exc:
        raise CaptionflowError(f"image {path} cannot be read ({exc}): rerun resize_images") from None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def read_predictions(path):
    """{image id: caption} of an evaluate predictions file."""
    try:
        with open(path) as f:
            return {p["image_id"]: p["caption"] for p in json.load(f)}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CaptionflowError(f"predictions {path} cannot be read ({exc}): rerun evaluate") from None


STYLE = """
body { font-family: sans-serif; margin: 1em; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(330px, 1fr)); gap: 12px; }
.item { display: flex; gap: 10px; border: 1px solid #ccc; border-radius: 6px; padding: 8px; }
.item img { width: 128px; height: 128px; object-fit: contain; flex: none; }
.item dl { margin: 0; font-size: 13px; }
.item dt { font-weight: bold; color: #345; }
.item dd { margin: 0 0 4px 0; }
.item dd.ref { color: #666; font-style: italic; }
"""


def write_gallery(experiment, stage_predictions, references, labels_json, manifest, out_html, images=8, split="test"):
    """Write the gallery of the first `images` images of `split`.

    stage_predictions: {stage: predictions JSON} in stage order; references: the raw
    references JSON ({split: {id: [captions]}})."""
    captions = {stage: read_predictions(path) for stage, path in stage_predictions.items()}
    with open(references) as f:
        refs = json.load(f)[split]
    files = image_files(manifest)
    cards = []
    for image_id in first_images(labels_json, split, images):
        rows = [
            f"<dt>{html.escape(stage)}</dt><dd>{html.escape(c.get(image_id, '(not captioned)'))}</dd>"
            for stage, c in captions.items()
        ]
        rows += [f"<dt>reference</dt><dd class='ref'>{html.escape(r)}</dd>" for r in refs[str(image_id)][:REFERENCES]]
        cards.append(
            f"<div class='item' data-image-id='{image_id}'><img src='{thumbnail_uri(files[image_id])}' alt='test image {image_id}' "
            f"title='test image {image_id}'><dl>{''.join(rows)}</dl></div>"
        )
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(experiment)}: caption gallery</title>"
        f"<style>{STYLE}</style></head><body><h2>{html.escape(experiment)}: {len(cards)} {split} images</h2>"
        f"<p>Each stage's caption (beam search, as evaluated) and {REFERENCES} of the human references.</p>"
        f"<div class='gallery'>{''.join(cards)}</div></body></html>\n"
    )
    write_text(out_html, page)
    print(f"gallery of {len(cards)} {split} images: {out_html}", flush=True)
