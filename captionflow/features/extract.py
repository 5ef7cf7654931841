"""Stage extract_features (and, later, regenerate_features): images -> grid features in HDF5.

One HDF5 per split, rows in the order of that split's images in the labels JSON:
    att       (N, R, D)  grid features, R = h * w regions (row-major over the grid)
    fc        (N, D)     the grid's mean (the pooled feature)
    image_id  (N,)       int64 image ids, to check the order against the labels JSON
Attributes record the backbone (name, weights, seed, image size, grid size) and the dtype.

Resumable in chunks of whole batches (captionflow.utils.h5): rows go into `<out>.partial`;
after each chunk `<out>.partial.json` records the rows complete and a fingerprint of the
settings, images and their sources. A rerun with the same fingerprint continues after the
last complete chunk; anything else starts over. The finished file is renamed onto `<out>`.
`extract_split` is the loop regions.py runs too.
"""

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from captionflow.errors import CaptionflowError
from captionflow.utils.device import resolve_device
from captionflow.utils.h5 import commit, finish, ids_digest, open_partial, write_rows
from captionflow.utils.io import file_stamp
from captionflow.utils.precision import Precision
from captionflow.utils.threads import use_threads

DTYPES = {"float16": np.float16, "float32": np.float32}
NAMED_WEIGHTS = ("none", "imagenet", "coco")  # weights settings that name no file


@dataclass(frozen=True)
class FeatureConfig:
    """How one grid-feature extraction runs: the `features` config section but the network's
    own keys, which the Backbone holds (no defaults here: captionflow.config.build fills them
    from the schema)."""

    SECTION: ClassVar[str] = "features"

    dtype: str
    batch_size: int
    num_workers: int
    chunk_batches: int  # batches per resumable chunk
    device: str  # "auto" | "cpu" | "cuda"
    precision: str  # fp32 | bf16 | fp16: the backbone's forward (captionflow.utils.precision)


class ImageFiles(Dataset):
    """Resized JPEGs -> uint8 tensors (3, S, S); normalisation happens on the device."""

    def __init__(self, paths, size):
        self.paths = paths
        self.size = size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as img:
            arr = np.array(img.convert("RGB"))  # writable copy for torch
        if arr.shape[:2] != (self.size, self.size):
            raise ValueError(f"{self.paths[i]} is {arr.shape[1]}x{arr.shape[0]}, expected {self.size}x{self.size}")
        return torch.from_numpy(arr).permute(2, 0, 1)


def images_of(files, rows):
    """Decode a batch's images (uint8 (B, 3, S, S)): streamed, never the whole split in memory."""
    return torch.stack([files[i] for i in rows])


@torch.no_grad()
def image_features(grid, files, device, batch=32):
    """{"att": (M, R, D), "fc": (M, D)} float32 CPU features of every image of an
    ImageFiles, computed by GridFeatures `grid` in eval mode, `batch` images at a time."""
    grid.eval()
    att, fc = [], []
    for b in range(0, len(files), batch):
        a, f = grid(images_of(files, range(b, min(b + batch, len(files)))).to(device))
        att.append(a.float().cpu())
        fc.append(f.float().cpu())
    return {"att": torch.cat(att), "fc": torch.cat(fc)}


def split_images(labels_json, manifest):
    """{split: (ids, resized paths)} in labels-JSON order."""
    with open(labels_json) as f:
        images = json.load(f)["images"]
    with open(manifest) as f:
        man = json.load(f)
    resized = {img["id"]: os.path.join(man["image_dir"], img["file_path"]) for img in man["images"]}
    out = {}
    for img in images:
        ids, paths = out.setdefault(img["split"], ([], []))
        ids.append(img["id"])
        paths.append(resized[img["id"]])
    return out, man["size"]


def backbone_images(backbone, labels_json, manifest):
    """{split: (ids, resized paths)} of the images `backbone` (a Backbone) runs on, refused in
    one line when they are resized to another side than the backbone is set for."""
    splits, size = split_images(labels_json, manifest)
    if size != backbone.image_size:
        raise CaptionflowError(
            f"the images of {manifest} are resized to {size} px, but backbone {backbone.name} is set for "
            f"{backbone.image_size} px (resize.size); rerun resize_images, or give the backbone of these images"
        )
    return splits


def manifest_sources(manifest):
    """The manifest's fingerprint of the resized images' sources (None in an older manifest)."""
    with open(manifest) as f:
        return json.load(f).get("sources")


def _fingerprint(settings, ids, size, sources):
    """What a partial file must match to be resumed: settings (a weights file by its stamp),
    images and their sources (the manifest's fingerprint of the source images, so a changed
    image starts over). settings: {name: value}, with the network's `weights`."""
    weights = settings["weights"] if settings["weights"] in NAMED_WEIGHTS else file_stamp(settings["weights"])
    spec = {**settings, "weights": weights, "size": size, "ids": ids_digest(ids), "sources": sources}
    for k in ("num_workers", "device"):  # do not change the numbers
        spec.pop(k)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _nonfinite_message(att32, fc32, att, fc, ids, paths, row, out, backbone, dtype):
    """Why a batch's features are not finite, naming its first such image (split, row, id)."""
    b = len(att)
    stored = np.isfinite(att.reshape(b, -1)).all(1) & np.isfinite(fc).all(1)
    computed = np.isfinite(att32.reshape(b, -1)).all(1) & np.isfinite(fc32).all(1)
    i = int(np.flatnonzero(~stored)[0])
    where = f"image {ids[row + i]} ({paths[row + i]}; split {Path(out).stem}, row {row + i})"
    if not computed[i]:  # NaN/inf out of the backbone itself
        return (
            f"{backbone.name} features of {where} are NaN or inf: the backbone with features.weights {backbone.weights} "
            "computes no finite numbers for it; use sound weights (not those of a diverged run) and rerun"
        )
    big = float(np.abs(att32[i]).max())
    return f"{backbone.name} features of {where} are not finite in {dtype} (max |x| = {big:.3g}); use features.dtype: float32"


def _grid_rows(model, backbone, cfg, precision, ids, paths, out, images, row):
    """uint8 images (B, 3, S, S) of rows row.. -> {"att": (B, R, D), "fc": (B, D)} in cfg.dtype.
    Raises CaptionflowError naming the first image whose features are not finite."""
    if images.device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)  # the layout cuDNN convolves fastest
    with precision.autocast():
        outputs = model(images)
    att32, fc32 = (x.float().cpu().numpy() for x in outputs)
    att, fc = att32.astype(cfg.dtype), fc32.astype(cfg.dtype)
    if not (np.isfinite(att).all() and np.isfinite(fc).all()):
        raise CaptionflowError(_nonfinite_message(att32, fc32, att, fc, ids, paths, row, out, backbone, cfg.dtype))
    return {"att": att, "fc": fc}


def extract_split(batch_rows, ids, paths, size, out, datasets, attrs, cfg, settings, device, stage):
    """Rows of one split's images into `out`, resuming a `<out>.partial` if it fits.

    batch_rows(images, row): uint8 images (B, 3, S, S) on `device` of rows row..row+B ->
    {name: (B, ...) array} of `datasets` ({name: (shape, dtype)}); called without grad.
    cfg: batch_size, num_workers, chunk_batches; settings: what the fingerprint covers (with
    attrs["sources"], if any; num_workers and device never change the numbers); stage: the
    progress bar's name.
    """
    out = Path(out)
    key = _fingerprint(settings, ids, size, attrs.get("sources"))
    f, state = open_partial(out, key, datasets, ids, attrs)
    n, done = len(ids), int(state["rows_done"]) if state else 0
    if state:
        print(f"resuming {out.name} at row {done} of {n}", flush=True)
    chunk_rows = cfg.batch_size * cfg.chunk_batches  # chunks are whole batches: same batches on resume
    loader = DataLoader(
        ImageFiles(paths[done:], size),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
    )
    row = done
    try:
        with tqdm(total=n, initial=done, desc=f"{stage} {out.stem}", unit="img") as bar:
            for images in loader:
                with torch.no_grad():
                    rows = batch_rows(images.to(device, non_blocking=True), row)
                write_rows(f, row, rows)
                row += len(images)
                bar.update(len(images))
                if (row - done) % chunk_rows == 0 or row == n:
                    commit(f, out, {"fingerprint": key, "rows_done": row})
    except BaseException:
        f.close()
        raise
    finish(f, out)


def extract_features(labels_json, manifest, outputs, backbone, cfg, threads=1):
    """Extract features for every split in `outputs` ({split: HDF5 path}) with the network
    `backbone` (a Backbone) builds."""
    use_threads(threads)
    device = resolve_device(cfg.device)
    if cfg.dtype not in DTYPES:
        raise CaptionflowError(f"features.dtype {cfg.dtype!r} is not one of {sorted(DTYPES)}")
    precision = Precision(cfg.precision, device, "features.precision")
    splits, size = backbone_images(backbone, labels_json, manifest), backbone.image_size
    model = backbone.build().to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    attrs = {
        "backbone": backbone.name,
        "weights": str(backbone.weights),
        "seed": backbone.seed,
        "dtype": cfg.dtype,
        "image_size": size,
        "grid_size": backbone.grid_size,
    }
    sources = manifest_sources(manifest)
    if sources:
        attrs["sources"] = sources  # the resized images' source fingerprint (provenance)
    with torch.no_grad():
        att, fc = model(torch.zeros(1, 3, size, size, device=device))  # the shapes of a row
    for split, out in outputs.items():
        if split not in splits:
            raise CaptionflowError(f"split {split!r} has no images in {labels_json} (splits: {sorted(splits)})")
        ids, paths = splits[split]
        datasets = {
            "att": ((len(ids), *att.shape[1:]), DTYPES[cfg.dtype]),
            "fc": ((len(ids), fc.shape[1]), DTYPES[cfg.dtype]),
        }
        rows = functools.partial(_grid_rows, model, backbone, cfg, precision, ids, paths, out)
        settings = {**asdict(cfg), **asdict(backbone), "weights": str(backbone.weights)}
        extract_split(rows, ids, paths, size, out, datasets, attrs, cfg, settings, device, "extract_features")
        print(f"{split}: {len(ids)} images -> {out}", flush=True)
