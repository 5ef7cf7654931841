"""Caption new images with a bundle: `captionflow.load(bundle).caption(images)` (Captioner).

The images go through what the workflow did to the training images, from the bundle's
own settings: decode and resize as resize_images does (same resampling, same JPEG round
trip at the same quality), the bundle's backbone, the features' dtype, then the model
and the bundle's decoding settings. A workflow's test images captioned from a bundle get
the captions its evaluate stage wrote.

What load_bundle cannot check from the file alone is checked here, where the parts are
built: that the backbone at the bundle's image size gives the feature grid the model read,
and that an ONNX folder was exported from this very bundle.
"""

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from captionflow.config import section_defaults
from captionflow.data.resize import MAX_PIXELS, fit_image, read_resized, to_rgb
from captionflow.decoding.ensemble import Ensemble, member_feats
from captionflow.decoding.search import decode, sample, to_words
from captionflow.deploy.bundle import (
    EXPORT_AGAIN,
    FEATURE_DTYPES,
    bundle_backbone,
    bundle_path,
    check_bundle,
    fingerprint,
    load_bundle,
)
from captionflow.errors import CaptionflowError
from captionflow.models import create_model
from captionflow.utils.device import resolve_device
from captionflow.utils.state import load_checked


class UnreadableImage(CaptionflowError):
    """An input that is not a readable image (the CLI reports it and goes on)."""


@dataclass(frozen=True)
class Preprocess:
    """How a member's images were made: resize mode and side, JPEG quality."""

    resize_mode: str
    size: int
    jpeg_quality: int

    def __call__(self, image, max_pixels=MAX_PIXELS):
        """A path or a PIL image -> uint8 tensor (3, size, size), as resize_images + extraction read it."""
        if isinstance(image, Image.Image):
            resized = fit_image(to_rgb(image), self.size, self.resize_mode)
        else:
            resized, reason = read_resized(image, self.size, self.resize_mode, max_pixels)
            if reason:
                raise UnreadableImage(f"{image}: {reason}")
        buffer = io.BytesIO()  # the workflow trained on JPEG copies: the same round trip
        resized.save(buffer, format="JPEG", quality=self.jpeg_quality)
        with Image.open(buffer) as img:
            arr = np.array(img.convert("RGB"))
        return torch.from_numpy(arr).permute(2, 0, 1)


class BundleFeatures(nn.Module):
    """uint8 images -> {"att", "fc"} as the model read them: the backbone's grid, rounded to
    the feature files' dtype, zeroed for an image-blind model (also the ONNX encoder's)."""

    def __init__(self, grid, dtype, blind):
        super().__init__()
        self.grid, self.dtype, self.blind = grid, dtype, blind

    def forward(self, images):
        att, fc = self.grid(images)
        att, fc = (x.to(self.dtype).float() for x in (att, fc))  # float16 files round features
        if self.blind:
            att, fc = torch.zeros_like(att), torch.zeros_like(fc)
        return att, fc


class Member:
    """One bundle's model, backbone and preprocessing on a device; with `onnx` (a folder
    of captionflow export-onnx), encoder and decoder steps run on onnxruntime instead."""

    def __init__(self, bundle, source, device, onnx=None):
        spec = bundle["model"]
        self.model = create_model(spec["name"], **spec["args"])
        load_checked(self.model, spec["weights"], source, f"model {spec['name']}")
        self.model.to(device).eval()
        self.ix_to_word = bundle["vocabulary"]["ix_to_word"]
        self.preprocess = Preprocess(**{k: bundle["preprocess"][k] for k in ("resize_mode", "size", "jpeg_quality")})
        self.device = device
        self.source = bundle["features"]["source"]
        self.onnx = None
        backbone, weights = bundle_backbone(bundle)
        if backbone is None:
            self.features = None
            return
        grid = backbone.build()
        load_checked(grid.backbone, weights, source, f"backbone {backbone.name}")
        dtype = FEATURE_DTYPES[bundle["preprocess"].get("feature_dtype", "float32")]
        self.features = BundleFeatures(grid, dtype, spec.get("blind", False)).to(device).eval()
        check_feature_grid(self.features, bundle, source, device)
        if onnx is not None:
            from captionflow.deploy.onnx import OnnxCaptioner

            self.onnx = self.model = OnnxCaptioner(
                onnx, bundle={"file": str(source), "fingerprint": fingerprint(bundle)}
            )

    @torch.no_grad()
    def feats(self, images):
        """uint8 images (B, 3, S, S) -> what the model's init_state reads."""
        if self.features is None:
            raise CaptionflowError(
                f"this bundle's model reads {self.source} region features, which captionflow cannot compute from an image; "
                "caption with a bundle of a grid-feature experiment (features.backbone: resnet*, swin*, ...)"
            )
        if self.onnx is not None:
            return {"images": images}
        att, fc = self.features(images.to(self.device))
        return {"att": att, "fc": fc}


@torch.no_grad()
def check_feature_grid(features, bundle, source, device):
    """Run the backbone once on a blank image of the bundle's size: its (regions, feature
    size) must be the grid the model read (features.regions; a version 1 bundle records
    none) and the model's feat_dim. A backbone and preprocessing resized alike to another
    side agree with each other, but a ResNet then gives another grid, silently."""
    size = bundle["backbone"]["image_size"]
    att, _ = features(torch.zeros(1, 3, size, size, dtype=torch.uint8, device=device))
    got = tuple(att.shape[1:])
    want = (bundle["features"].get("regions", got[0]), bundle["model"]["args"].get("feat_dim", got[1]))
    if got != want:
        raise CaptionflowError(
            f"bundle {source}: backbone {bundle['backbone']['name']} at {size} px gives {got[0]} regions of {got[1]} features, "
            f"but the model read {want[0]} regions of {want[1]} (the feature files' grid); {EXPORT_AGAIN}"
        )


class Captioner:
    """A bundle ready to caption: `caption(images)` with images as paths or PIL images.

    onnx: the folder `captionflow export-onnx` wrote from this bundle; the backbone, encoder
    and decoder steps then run on onnxruntime (CPU), decoded by the same search code."""

    def __init__(self, bundle, device="auto", onnx=None):
        source = bundle_path(bundle) if not isinstance(bundle, dict) else "<bundle>"
        self.bundle = load_bundle(bundle) if not isinstance(bundle, dict) else bundle
        if isinstance(bundle, dict):  # a file's parts are checked by load_bundle
            check_bundle(self.bundle, source)
        self.device = resolve_device(device) if onnx is None else torch.device("cpu")
        members = self.bundle.get("members") or [self.bundle]
        if onnx is not None and len(members) > 1:
            raise CaptionflowError(f"bundle {source} is an ensemble: ONNX exports are of single experiments' bundles")
        self.members = [Member(m, source, self.device, onnx) for m in members]
        vocabularies = {tuple(sorted(m.ix_to_word.items())) for m in self.members}
        if len(vocabularies) > 1:
            raise CaptionflowError(f"bundle {source}: the ensemble's members have different vocabularies")
        self.ix_to_word = self.members[0].ix_to_word
        self.model = (
            self.members[0].model if len(self.members) == 1 else Ensemble([m.model for m in self.members]).eval()
        )
        # a bundle exported before a decoding key existed decodes with the schema's default
        self.decoding = {**section_defaults("evaluate"), **self.bundle["decoding"]}

    def images(self, image):
        """One path or PIL image -> its uint8 tensor per distinct preprocessing of the members."""
        return {p: p(image) for p in dict.fromkeys(m.preprocess for m in self.members)}

    @torch.no_grad()
    def caption_tensors(self, prepared, beam_size=None, max_len=None, sample_captions=False, temperature=1.0, seed=0):
        """[images() of each image] -> captions, one batch."""
        feats = []
        for m in self.members:
            feats.append(m.feats(torch.stack([p[m.preprocess] for p in prepared])))
        feats = feats[0] if len(self.members) == 1 else member_feats(feats)
        max_len = max_len or self.decoding["max_len"]
        if sample_captions:
            generator = torch.Generator(device=self.device).manual_seed(seed)
            seqs, _ = sample(self.model, feats, n=1, max_len=max_len, temperature=temperature, generator=generator)
        else:
            beam = beam_size or self.decoding["beam_size"]
            seqs, _ = decode(
                self.model, feats, "beam", beam, max_len, self.decoding["alpha"], self.decoding["block_trigrams"]
            )
        return to_words(seqs.cpu(), self.ix_to_word)

    def caption(self, images, batch_size=16, **options):
        """Paths or PIL images -> their captions (options: beam_size, max_len,
        sample_captions, temperature, seed). An unreadable file raises UnreadableImage."""
        single = isinstance(images, (str, Path, Image.Image))
        images = [images] if single else list(images)
        captions = []
        for b in range(0, len(images), batch_size):
            captions += self.caption_tensors([self.images(i) for i in images[b : b + batch_size]], **options)
        return captions[0] if single else captions
