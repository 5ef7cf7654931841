"""Stage extract_regions: images -> bottom-up-style region features from a Faster R-CNN.

For users who compute their own region features rather than import Anderson et al.'s
release (bottomup.py). The detector is torchvision's fasterrcnn_resnet50_fpn (Ren et al.
2015, Faster R-CNN; Lin et al. 2017, FPN). Written in bottomup.py's region layout (att,
att_mask, fc, boxes, num_boxes, image_id), one HDF5 per split in labels-JSON order.

Regions of an image: exactly `max_boxes` boxes, the first of
  1. the detections, highest score first (after the detector's per-class NMS and
     `detector_score_thresh`, as torchvision's inference returns them),
  2. then the RPN proposals, highest objectness first,
  3. then a fixed grid: the whole image, its 2x2 cells, its 3x3 cells, ...
Padding is rarely needed with trained weights; with random-init weights (weights: none)
what comes out depends only on the seed, so the path is deterministic on a given device.
Every image gets num_boxes real regions, so att_mask is all True and num_boxes constant.
Boxes may overlap across the three sources (no cross-source NMS).

Region vectors: each box is RoI-aligned from the FPN levels by the detector's own
MultiScaleRoIAlign (7x7, level chosen by box size) and passed through its box head's two
FC layers (TwoMLPHead), i.e. the 1024-d vector the classifier sees for that box. Unlike
the Caffe release (features of the proposal behind each detection), the features here
are pooled at the final, regressed boxes, so box and feature agree.

Weights: "none" random init from `seed` (offline demos and tests); "coco" torchvision's
COCO weights (downloaded, or read from the torch hub cache, $TORCH_HOME/hub/checkpoints,
filled on a machine with internet); or a path to a .pth state dict of the same
architecture (e.g. a detector trained on Visual Genome; its class count is read from the
file). Resized images are read as extract.py reads them (manifest, ImageFiles); the
detector itself rescales them to `detector_min_size` as it was trained to.

Resumable in chunks of whole batches by extract.py's loop (`extract_split`): `<out>.partial`
plus `<out>.partial.json`, atomic rename at the end; a changed setting, weights file or
source image (the manifest's `sources`) starts over.
"""

import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torchvision
from torch import nn
from torchvision.models.detection.transform import resize_boxes

from captionflow.errors import CaptionflowError
from captionflow.features.backbones import load_state_dict_file
from captionflow.features.bottomup import region_datasets, region_rows
from captionflow.features.extract import DTYPES, extract_split, manifest_sources, split_images
from captionflow.utils.device import resolve_device
from captionflow.utils.state import load_checked
from captionflow.utils.threads import use_threads

DETECTOR = "fasterrcnn_resnet50_fpn"


@dataclass(frozen=True)
class RegionConfig:
    """Settings of one region extraction: the `features` config section's region keys and
    the global `seed` (no defaults here: captionflow.config.build fills them from the schema)."""

    SECTION: ClassVar[str] = "regions"

    max_boxes: int  # regions per image
    weights: str  # "none" | "coco" | path to a .pth state dict of fasterrcnn_resnet50_fpn
    dtype: str
    detector_min_size: int  # the detector rescales images to this shorter side
    detector_max_size: int  # ... and at most this longer side
    detector_proposals: int  # RPN proposals kept per image after NMS
    detector_score_thresh: float  # detections scoring below are dropped
    batch_size: int
    num_workers: int
    chunk_batches: int  # batches per resumable chunk
    device: str  # "auto" | "cpu" | "cuda"
    seed: int  # random init when weights == "none"


def _one_line(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def create_detector(weights="none", seed=0, **kwargs):
    """fasterrcnn_resnet50_fpn in eval mode; kwargs go to torchvision's FasterRCNN."""
    build = torchvision.models.detection.fasterrcnn_resnet50_fpn
    if weights == "coco":
        try:
            return build(weights="DEFAULT", weights_backbone=None, **kwargs).eval()
        except Exception as exc:  # no internet and no cached file, or a corrupt download
            raise CaptionflowError(
                f"could not load the COCO weights of {DETECTOR} ({_one_line(exc)}); run it once where there is "
                "internet (the file lands in the torch hub cache, $TORCH_HOME/hub/checkpoints) or set weights to a local .pth"
            ) from None
    torch.manual_seed(seed)
    if weights == "none":
        return build(weights=None, weights_backbone=None, **kwargs).eval()
    state = load_state_dict_file(weights)
    cls = state.get("roi_heads.box_predictor.cls_score.weight")
    model = build(weights=None, weights_backbone=None, num_classes=91 if cls is None else cls.shape[0], **kwargs)
    # Trained torchvision detectors use FrozenBatchNorm2d, which saves no num_batches_tracked;
    # the BatchNorm2d built here computes the same in eval mode.
    own = model.state_dict()
    state = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **state}
    load_checked(model, state, weights, DETECTOR)
    return model.eval()


def grid_boxes(image_size, n):
    """The first n boxes of: whole image, 2x2 cells, 3x3 cells, ... -> (n, 4) x1 y1 x2 y2.

    image_size: (h, w) in the coordinates the boxes are wanted in.
    """
    h, w = image_size
    boxes, cells = [], 1
    while len(boxes) < n:
        for i in range(cells):
            for j in range(cells):
                boxes.append((w * j / cells, h * i / cells, w * (j + 1) / cells, h * (i + 1) / cells))
        cells += 1
    return torch.tensor(boxes[:n], dtype=torch.float32)


class RegionFeatures(nn.Module):
    """Faster R-CNN -> num_boxes regions per image.

    forward: uint8 images (B, 3, H, W) -> feats (B, K, 1024), boxes (B, K, 4) x1 y1 x2 y2
    divided by (W, H, W, H); K = num_boxes.
    """

    def __init__(self, detector, num_boxes):
        super().__init__()
        self.detector = detector
        self.num_boxes = num_boxes
        self.feat_dim = detector.roi_heads.box_head.fc7.out_features

    def choose(self, detected, proposals, image_size):
        """Detections, then proposals, then grid boxes: the first num_boxes -> (K, 4)."""
        k = self.num_boxes
        boxes = torch.cat([detected[:k], proposals[: max(0, k - len(detected))]])
        if len(boxes) < k:
            boxes = torch.cat([boxes, grid_boxes(image_size, k - len(boxes)).to(boxes.device)])
        return boxes

    def forward(self, images):
        det = self.detector
        original = [tuple(img.shape[-2:]) for img in images]
        batch, _ = det.transform([img.float() / 255 for img in images])  # rescale, normalise, pad
        fmaps = det.backbone(batch.tensors)  # FPN levels {"0".."3", "pool"}: (B, 256, h_l, w_l)
        proposals, _ = det.rpn(batch, fmaps)  # B x (P, 4), objectness order
        detections, _ = det.roi_heads(fmaps, proposals, batch.image_sizes)  # B x {"boxes": (Q, 4), ...}, score order
        chosen = [self.choose(d["boxes"], p, size) for d, p, size in zip(detections, proposals, batch.image_sizes)]
        pooled = det.roi_heads.box_roi_pool(fmaps, chosen, batch.image_sizes)  # (B*K, 256, 7, 7)
        feats = det.roi_heads.box_head(pooled).view(len(images), self.num_boxes, -1)  # (B, K, 1024)
        boxes = []
        for b, size, (h, w) in zip(chosen, batch.image_sizes, original):
            b = resize_boxes(b, list(size), [h, w])  # back to the input image's pixels
            boxes.append(b / b.new_tensor([w, h, w, h]))
        return feats, torch.stack(boxes).clamp(0.0, 1.0)


def _region_rows(model, cfg, ids, paths, out, images, row):
    """uint8 images (B, 3, H, W) of rows row.. -> their rows of the region layout (bottomup.region_rows)."""
    feats, boxes = model(images)
    b = len(feats)
    images = paths[row] if b == 1 else f"{paths[row]} .. {paths[row + b - 1]}"
    where = f"{images} (split {Path(out).stem}, rows {row}..{row + b - 1}, image ids {ids[row]}..{ids[row + b - 1]})"
    return region_rows(list(feats.cpu().numpy()), list(boxes.cpu().numpy()), cfg.max_boxes, cfg.dtype, where)


def extract_regions(labels_json, manifest, outputs, cfg, threads=1):
    """Extract region features for every split in `outputs` ({split: HDF5 path}); cfg: a
    RegionConfig (captionflow.config.build)."""
    use_threads(threads)
    device = resolve_device(cfg.device)
    if cfg.dtype not in DTYPES:
        raise CaptionflowError(f"regions dtype {cfg.dtype!r} is not one of {sorted(DTYPES)}")
    if cfg.max_boxes < 1:
        raise CaptionflowError(f"features.max_boxes must be at least 1, not {cfg.max_boxes}")
    detector = create_detector(
        cfg.weights,
        cfg.seed,
        min_size=cfg.detector_min_size,
        max_size=cfg.detector_max_size,
        rpn_post_nms_top_n_test=cfg.detector_proposals,
        box_score_thresh=cfg.detector_score_thresh,
        box_detections_per_img=max(100, cfg.max_boxes),
    )
    model = RegionFeatures(detector, cfg.max_boxes).to(device).eval()
    splits, size = split_images(labels_json, manifest)
    attrs = {
        "source": DETECTOR,
        "weights": str(cfg.weights),
        "dtype": cfg.dtype,
        "image_size": size,
        "max_boxes": cfg.max_boxes,
        "feat_dim": model.feat_dim,
        "min_size": cfg.detector_min_size,
        "proposals": cfg.detector_proposals,
        "score_thresh": cfg.detector_score_thresh,
        "boxes_format": "x1 y1 x2 y2 / (image_w, image_h, image_w, image_h)",
        "max_num_boxes": cfg.max_boxes,
    }
    sources = manifest_sources(manifest)
    if sources:
        attrs["sources"] = sources  # the resized images' source fingerprint (provenance; resume)
    for split, out in outputs.items():
        if split not in splits:
            raise CaptionflowError(f"split {split!r} has no images in {labels_json} (splits: {sorted(splits)})")
        ids, paths = splits[split]
        datasets = region_datasets(len(ids), cfg.max_boxes, model.feat_dim, cfg.dtype)
        rows = functools.partial(_region_rows, model, cfg, ids, paths, out)
        extract_split(rows, ids, paths, size, out, datasets, attrs, cfg, asdict(cfg), device, "extract_regions")
        print(f"{split}: {len(ids)} images x {cfg.max_boxes} regions -> {out}", flush=True)
