"""Backbone registry: name -> a module mapping images (B, 3, H, W) to a grid (B, D, h, w).

`features.backbone` is a registered torchvision ResNet (resnet18 ... resnet152) or any timm
model name (e.g. swin_large_patch4_window12_384, ExpansionNet v2's backbone, or
convnext_base): timm's `forward_features` grid, channels-last outputs (Swin) permuted and
token sequences (ViT) reshaped to a square grid. Weights come from one of
  "none"      random initialisation from the config seed (the offline demo default),
  "imagenet"  the library's pretrained weights (downloaded, or read from the torch hub
              cache that `prefetch` fills on machines with internet),
  a path      a local state dict (`.pth`), e.g. for air-gapped GPU nodes or a backbone
              fine-tuned by `finetune_e2e`; keys and shapes are checked before loading.

`Backbone` is the whole description of that network (name, weights, seed, image size, grid
size) as one value: the rules build it once from the config and every stage that runs the
network builds it from that value, so two stages given the same value run the same network.
"""

from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

from captionflow.errors import CaptionflowError
from captionflow.utils.state import first_nonfinite, load_checked, load_torch_file

BACKBONES = {}

# ImageNet statistics used by every registered backbone's preprocessing.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def register_backbone(name):
    """Decorator: add a builder `fn(pretrained: bool) -> (trunk, out_dim)` to the registry."""

    def wrap(fn):
        BACKBONES[name] = fn
        return fn

    return wrap


class GridBackbone(nn.Module):
    """A trunk producing a (B, D, h, w) grid, plus the normalisation it expects.

    forward: uint8 or float images (B, 3, H, W) in [0, 255] -> (B, D, h, w).
    """

    def __init__(self, trunk, out_dim, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.trunk = trunk
        self.out_dim = out_dim
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, images):
        x = (images.float() - self.mean) / self.std
        return self.trunk(x)

    def stages(self):
        """The trunk as a list of stages (lists of modules), input side first; what
        finetune_e2e's `freeze_stages` counts. ResNet: stem (conv1, bn1, relu, maxpool),
        layer1..layer4; timm: its stem / patch embedding, then its stages."""
        if isinstance(self.trunk, TimmTrunk):
            return self.trunk.stages()
        trunk = list(self.trunk.children())
        return [trunk[:4]] + [[m] for m in trunk[4:]]


class TimmTrunk(nn.Module):
    """A timm model's `forward_features` as a (B, D, h, w) grid."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        y = self.model.forward_features(x)
        if y.ndim == 3:  # ViT-style tokens (B, N, D): drop class/register tokens, square grid
            y = y[:, getattr(self.model, "num_prefix_tokens", 0) :]
            side = int(round(y.shape[1] ** 0.5))
            return y.transpose(1, 2).reshape(y.shape[0], y.shape[2], side, side)
        if getattr(self.model, "output_fmt", "NCHW") == "NHWC":  # Swin
            y = y.permute(0, 3, 1, 2)
        return y.contiguous()

    def stages(self):
        m = self.model
        stem = [
            getattr(m, n) for n in ("stem", "patch_embed", "conv1", "bn1") if isinstance(getattr(m, n, None), nn.Module)
        ]
        for name in ("stages", "layers", "blocks"):
            if isinstance(getattr(m, name, None), nn.Sequential | nn.ModuleList):
                return [stem] + [[stage] for stage in getattr(m, name)]
        return [stem]


def _timm_backbone(name, pretrained, image_size):
    """timm model `name` without its classifier -> (TimmTrunk, out_dim, mean, std)."""
    kwargs = {"pretrained": pretrained, "num_classes": 0}
    try:  # transformers (Swin, ViT) are built for the images' size; convnets take any
        model = (
            timm.create_model(name, img_size=image_size, **kwargs) if image_size else timm.create_model(name, **kwargs)
        )
    except TypeError:
        model = timm.create_model(name, **kwargs)
    cfg = model.pretrained_cfg
    return (
        TimmTrunk(model),
        model.num_features,
        tuple(cfg.get("mean", IMAGENET_MEAN)),
        tuple(cfg.get("std", IMAGENET_STD)),
    )


def _torchvision_resnet(name):
    def build(pretrained):
        weights = "DEFAULT" if pretrained else None
        model = torchvision.models.get_model(name, weights=weights)
        out_dim = model.fc.in_features
        # Drop the global pool and classifier: keep the last conv stage's grid.
        trunk = nn.Sequential(*list(model.children())[:-2])
        return trunk, out_dim

    return build


for _depth in (18, 34, 50, 101, 152):
    register_backbone(f"resnet{_depth}")(_torchvision_resnet(f"resnet{_depth}"))


def load_state_dict_file(path):
    """Read a state dict from `path` (raw, or under 'state_dict'/'model'/'backbone')."""
    path = Path(path)
    if not path.is_file():
        raise CaptionflowError(f"backbone weights file {path} does not exist")
    # weights_only: a pickle carrying code is refused, and nothing of it runs
    state = load_torch_file(
        path,
        "backbone weights file",
        "a state dict of tensors",
        "set features.weights to a .pth saved with torch.save(model.state_dict(), path)",
    )
    for key in ("backbone", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CaptionflowError(f"backbone weights file {path} holds no state dict of tensors")
    bad = first_nonfinite(state)
    if bad is not None:
        raise CaptionflowError(
            f"backbone weights file {path} holds NaN or inf values ({bad}): its features would be NaN; "
            "use weights from a run that did not diverge"
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def freeze_leading_stages(backbone, n):
    """Freeze the first n stages of a GridBackbone's trunk (ResNet: stem = conv1/bn1, then
    layer1..4; timm: stem or patch embedding, then its stages), for fine-tuning."""
    for stage in backbone.stages()[:n]:
        for module in stage:
            for p in module.parameters():
                p.requires_grad_(False)


def freeze_batchnorm_statistics(module):
    """BatchNorm layers of `module` to eval mode (fine-tuning batches are too small for
    their statistics); call after module.train()."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def create_backbone(name, weights="none", seed=0, image_size=None):
    """Build backbone `name` (registered torchvision ResNet or timm model) with `weights`
    ("none", "imagenet" or a .pth path). image_size: the images' side (timm Swin/ViT)."""
    if name not in BACKBONES and not timm.is_model(name):
        raise CaptionflowError(
            f"unknown backbone {name!r}: neither one of {', '.join(sorted(BACKBONES))} nor a timm model "
            "(python -c 'import timm; print(timm.list_models())')"
        )
    pretrained = weights == "imagenet"
    if not pretrained:
        torch.manual_seed(seed)
    try:
        if name in BACKBONES:
            trunk, out_dim = BACKBONES[name](pretrained=pretrained)
            backbone = GridBackbone(trunk, out_dim)
        else:
            trunk, out_dim, mean, std = _timm_backbone(name, pretrained, image_size)
            backbone = GridBackbone(trunk, out_dim, mean, std)
    except Exception as exc:  # pretrained: no internet and no cached file
        if not pretrained:
            raise
        raise CaptionflowError(
            f"could not load ImageNet weights for {name} ({type(exc).__name__}: {exc}); "
            "run the prefetch target where there is internet, or set features.weights to a local .pth"
        ) from None
    if weights not in ("none", "imagenet"):
        state = load_state_dict_file(weights)
        if any(k.endswith((".relative_position_index", ".attn_mask")) for k in state):  # timm keeps neither
            raise CaptionflowError(
                f"weights {weights} are a Microsoft-layout Swin checkpoint (relative_position_index / attn_mask "
                f"buffers), not timm's: convert them with `captionflow import-weights swin --checkpoint {weights} "
                "--out swin.pt` and set features.weights to swin.pt"
            )
        if all(not k.startswith("trunk.") for k in state):  # a library checkpoint, not ours
            state = _classifier_to_trunk(state, trunk) if name in BACKBONES else _timm_to_trunk(state, trunk)
        load_checked(backbone, state, weights, f"backbone {name}")
    return backbone


def _timm_to_trunk(state, trunk):
    """timm checkpoint keys -> ours (under trunk.model.), the classifier dropped."""
    keep = trunk.model.state_dict()
    return {
        f"trunk.model.{k}": v for k, v in state.items() if k in keep or not k.startswith(("head", "fc.", "classifier"))
    }


def _classifier_to_trunk(state, trunk):
    """torchvision classifier keys ('layer1.0.conv1.weight', 'fc.weight') -> trunk keys."""
    # The trunk is nn.Sequential(children[:-2]); map child names to their Sequential index.
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    index = {n: str(i) for i, n in enumerate(names[: len(trunk)])}
    out = {}
    for k, v in state.items():
        head, _, rest = k.partition(".")
        if head in ("fc", "avgpool"):
            continue  # the classifier is not part of the feature trunk
        out[f"trunk.{index.get(head, head)}.{rest}"] = v
    return out


class GridFeatures(nn.Module):
    """Backbone -> (att (B, R, D), fc (B, D)): the grid as R = h * w regions (row-major),
    average-pooled to grid_size x grid_size when grid_size > 0, and its mean."""

    def __init__(self, backbone, grid_size=0):
        super().__init__()
        self.backbone = backbone
        self.pool = nn.AdaptiveAvgPool2d(grid_size) if grid_size else nn.Identity()

    def forward(self, images):
        grid = self.backbone(images)  # (B, D, h, w)
        fc = grid.mean(dim=(2, 3))
        att = self.pool(grid).flatten(2).transpose(1, 2)  # (B, h*w, D)
        return att, fc


@dataclass(frozen=True)
class Backbone:
    """The network that turns resized images into features, from the config (`features` and
    resize.size) to every stage that runs it: extraction, regenerate_features, finetune_e2e,
    train_scst_e2e, retrieval fine-tuning, bundles and the caption CLI."""

    name: str  # features.backbone: a registered ResNet or a timm model
    weights: str  # "none" (random init), "imagenet" or a .pth state dict (features.weights)
    seed: int  # the random initialisation's seed (the config's seed); unused with "imagenet"
    image_size: int  # the resized images' side (resize.size); timm transformers are built for it
    grid_size: int  # 0: the backbone's native grid; k: average-pooled to k x k (features.grid_size)

    def build(self):
        """The network: GridFeatures mapping uint8 images (B, 3, S, S) -> (att, fc)."""
        return GridFeatures(create_backbone(self.name, str(self.weights), self.seed, self.image_size), self.grid_size)
