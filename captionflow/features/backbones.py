"""Backbone registry: name -> a module mapping images (B, 3, H, W) to a grid (B, D, h, w).

Registry names are the config values of `features.backbone`. Weights come from one of
  "none"      random initialisation from the config seed (the offline demo default),
  "imagenet"  the library's pretrained weights (downloaded, or read from the torch hub
              cache that `prefetch` fills on machines with internet),
  a path      a local state dict (`.pth`), e.g. for air-gapped GPU nodes or a backbone
              fine-tuned by `finetune_e2e`; keys and shapes are checked before loading.
"""

from pathlib import Path

import torch
import torchvision
from torch import nn

from captionflow.errors import CaptionflowError
from captionflow.utils.state import load_checked

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

    def __init__(self, trunk, out_dim):
        super().__init__()
        self.trunk = trunk
        self.out_dim = out_dim
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, images):
        x = (images.float() - self.mean) / self.std
        return self.trunk(x)


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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, non-tensor payloads
        raise CaptionflowError(f"backbone weights file {path} cannot be read: {exc}") from None
    for key in ("backbone", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CaptionflowError(f"backbone weights file {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def create_backbone(name, weights="none", seed=0):
    """Build registry backbone `name` with `weights` ("none", "imagenet" or a .pth path)."""
    if name not in BACKBONES:
        raise CaptionflowError(f"unknown backbone {name!r}; registered: {', '.join(sorted(BACKBONES))}")
    if weights == "imagenet":
        try:
            trunk, out_dim = BACKBONES[name](pretrained=True)
        except Exception as exc:  # no internet and no cached file
            raise CaptionflowError(
                f"could not load ImageNet weights for {name} ({type(exc).__name__}: {exc}); "
                "run the prefetch target where there is internet, or set features.weights to a local .pth"
            ) from None
        return GridBackbone(trunk, out_dim)
    torch.manual_seed(seed)
    trunk, out_dim = BACKBONES[name](pretrained=False)
    backbone = GridBackbone(trunk, out_dim)
    if weights != "none":
        state = load_state_dict_file(weights)
        # Accept a full classifier state dict (torchvision layout) or a trunk-only one.
        if all(not k.startswith("trunk.") for k in state):
            state = _classifier_to_trunk(state, trunk)
        load_checked(backbone, state, weights, f"backbone {name}")
    return backbone


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
