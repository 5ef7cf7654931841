"""Stage extract_features (and, later, regenerate_features): images -> grid features in HDF5.

One HDF5 per split, rows in the order of that split's images in the labels JSON:
    att       (N, R, D)  grid features, R = h * w regions (row-major over the grid)
    fc        (N, D)     the grid's mean (the pooled feature)
    image_id  (N,)       int64 image ids, to check the order against the labels JSON
Attributes record the backbone, weights, dtype and image size.

Resumable in chunks: rows are written into `<out>.partial`, whose datasets are allocated
up front (so a kill mid-write cannot corrupt the file's metadata); after each chunk the
file is flushed and `<out>.partial.json` records how many rows are complete and a
fingerprint of the settings. A rerun with the same fingerprint continues after the last
complete chunk; anything else starts over. The finished file is renamed onto `<out>`.
"""

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from captionflow.errors import CaptionflowError
from captionflow.features.backbones import create_backbone
from captionflow.utils.device import resolve_device
from captionflow.utils.io import require_free_space, write_json
from captionflow.utils.threads import use_threads

DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass(frozen=True)
class FeatureConfig:
    """Settings of one feature extraction (the `features` config section)."""

    backbone: str = "resnet18"
    weights: str = "none"  # "none" | "imagenet" | path to a .pth state dict
    dtype: str = "float32"
    att_size: int = 0  # 0: the backbone's native grid; k: adaptive-average-pool to k x k
    batch_size: int = 32
    num_workers: int = 1
    chunk_batches: int = 4  # batches per resumable chunk
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    seed: int = 0  # random init when weights == "none"


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


class GridFeatures(nn.Module):
    """Backbone -> (att (B, R, D), fc (B, D)), optionally pooled to att_size x att_size."""

    def __init__(self, backbone, att_size=0):
        super().__init__()
        self.backbone = backbone
        self.pool = nn.AdaptiveAvgPool2d(att_size) if att_size else nn.Identity()

    def forward(self, images):
        grid = self.backbone(images)  # (B, D, h, w)
        fc = grid.mean(dim=(2, 3))
        att = self.pool(grid).flatten(2).transpose(1, 2)  # (B, h*w, D)
        return att, fc


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


def _fingerprint(cfg, ids, size, sources=None):
    """What a partial file must match to be resumed: settings, images and their sources
    (the manifest's fingerprint of the source images, so a changed image starts over)."""
    weights = cfg.weights
    if weights not in ("none", "imagenet"):
        st = os.stat(weights)
        weights = f"{os.path.abspath(weights)}:{st.st_size}:{st.st_mtime_ns}"
    spec = {**asdict(cfg), "weights": weights, "size": size, "ids": hashlib.sha256(np.asarray(ids).tobytes()).hexdigest(), "sources": sources}
    for k in ("num_workers", "device"):  # do not change the numbers
        spec.pop(k)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _open_partial(partial, progress, fingerprint, shapes, dtype, ids, attrs):
    """Open or create the partial HDF5; return (file, rows already complete)."""
    if partial.exists() and progress.exists():
        try:
            state = json.loads(progress.read_text())
            if state["fingerprint"] == fingerprint:
                f = h5py.File(partial, "r+")
                return f, int(state["rows_done"])
            print("settings changed since the interrupted run: starting over", flush=True)
        except (OSError, ValueError, KeyError) as exc:
            print(f"cannot resume from {partial} ({exc}): starting over", flush=True)
    progress.unlink(missing_ok=True)
    return preallocated_h5(partial, {name: (shape, dtype) for name, shape in shapes.items()}, ids, attrs), 0


def preallocated_h5(path, datasets, ids, attrs):
    """A new HDF5 at `path` with `datasets` ({name: (shape, dtype)}) allocated now, plus
    `image_id` and `attrs`. Contiguous storage allocated up front: later writes touch raw
    data only, never metadata, so a killed writer leaves the file readable. Space for
    all of it is checked first: a full disk is one line before anything is written."""
    needed = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in datasets.values())
    existing = os.path.getsize(path) if os.path.exists(path) else 0  # a file being replaced
    require_free_space(path, needed + 8 * len(ids) + 2**16 - existing)
    f = h5py.File(path, "w")
    for name, (shape, dtype) in datasets.items():
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        f.create_dataset(name, shape=shape, dtype=dtype, dcpl=dcpl)
    f.create_dataset("image_id", data=np.asarray(ids, dtype=np.int64))
    f.attrs.update(attrs)
    f.flush()
    return f


def _nonfinite_message(att32, fc32, att, fc, ids, paths, row, out, cfg):
    """Why a batch's features are not finite, naming its first such image (split, row, id)."""
    b = len(att)
    stored = np.isfinite(att.reshape(b, -1)).all(1) & np.isfinite(fc).all(1)
    computed = np.isfinite(att32.reshape(b, -1)).all(1) & np.isfinite(fc32).all(1)
    i = int(np.flatnonzero(~stored)[0])
    where = f"image {ids[row + i]} ({paths[row + i]}; split {Path(out).stem}, row {row + i})"
    if not computed[i]:  # NaN/inf out of the backbone itself
        return (
            f"{cfg.backbone} features of {where} are NaN or inf: the backbone with features.weights {cfg.weights} "
            "computes no finite numbers for it; use sound weights (not those of a diverged run) and rerun"
        )
    big = float(np.abs(att32[i]).max())
    return f"{cfg.backbone} features of {where} are not finite in {cfg.dtype} (max |x| = {big:.3g}); use features.dtype: float32"


def extract_split(model, ids, paths, size, out, cfg, device, attrs):
    """Extract features of one split into `out`, resuming a `<out>.partial` if it fits."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    progress = out.with_name(out.name + ".partial.json")
    fingerprint = _fingerprint(cfg, ids, size, attrs.get("sources"))
    with torch.no_grad():
        att, fc = model(torch.zeros(1, 3, size, size, device=device))
    n = len(ids)
    shapes = {"att": (n, *att.shape[1:]), "fc": (n, fc.shape[1])}
    f, done = _open_partial(partial, progress, fingerprint, shapes, DTYPES[cfg.dtype], ids, attrs)
    if done:
        print(f"resuming {out.name} at row {done} of {n}", flush=True)
    chunk_rows = cfg.batch_size * cfg.chunk_batches  # chunks are whole batches: same batches on resume
    loader = DataLoader(
        ImageFiles(paths[done:], size),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    row = done
    try:
        with tqdm(total=n, initial=done, desc=f"extract_features {out.stem}", unit="img") as bar:
            for images in loader:
                with torch.no_grad():
                    att, fc = model(images.to(device, non_blocking=True))
                att32, fc32 = att.cpu().numpy(), fc.cpu().numpy()
                att, fc = att32.astype(cfg.dtype), fc32.astype(cfg.dtype)
                if not (np.isfinite(att).all() and np.isfinite(fc).all()):
                    raise CaptionflowError(_nonfinite_message(att32, fc32, att, fc, ids, paths, row, out, cfg))
                b = len(att)
                f["att"][row : row + b] = att
                f["fc"][row : row + b] = fc
                row += b
                bar.update(b)
                if (row - done) % chunk_rows == 0 or row == n:
                    f.flush()  # data on disk before the progress file claims it
                    write_json(progress, {"fingerprint": fingerprint, "rows_done": row})
    finally:
        f.close()
    os.replace(partial, out)
    progress.unlink()


def extract_features(labels_json, manifest, outputs, cfg, threads=1):
    """Extract features for every split in `outputs` ({split: HDF5 path})."""
    use_threads(threads)
    device = resolve_device(cfg.device)
    if cfg.dtype not in DTYPES:
        raise CaptionflowError(f"features.dtype {cfg.dtype!r} is not one of {sorted(DTYPES)}")
    splits, size = split_images(labels_json, manifest)
    model = GridFeatures(create_backbone(cfg.backbone, cfg.weights, cfg.seed, size), cfg.att_size).to(device).eval()
    attrs = {
        "backbone": cfg.backbone,
        "weights": str(cfg.weights),
        "dtype": cfg.dtype,
        "image_size": size,
        "att_size": cfg.att_size,
    }
    with open(manifest) as f:
        sources = json.load(f).get("sources")
    if sources:
        attrs["sources"] = sources  # the resized images' source fingerprint (provenance)
    for split, out in outputs.items():
        if split not in splits:
            raise CaptionflowError(f"split {split!r} has no images in {labels_json} (splits: {sorted(splits)})")
        ids, paths = splits[split]
        extract_split(model, ids, paths, size, out, cfg, device, attrs)
        print(f"{split}: {len(ids)} images -> {out}", flush=True)
