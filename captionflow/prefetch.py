"""Target prefetch: download, on a machine with internet, what later jobs would fetch.

SPICE's Stanford CoreNLP jars (into pycocoevalcap) and, when features.weights is
`imagenet`, the backbone's pretrained weights: torchvision's into the torch hub cache
($TORCH_HOME), timm's into the Hugging Face hub cache ($HF_HOME). Compute nodes without
internet then find all of them on disk (export the same variables there).
"""

import torch

from captionflow.features.backbones import BACKBONES, create_backbone
from captionflow.metrics.coco import SPICE_LIB, fetch_spice_models
from captionflow.utils.io import write_json


def prefetch(out, backbone, weights):
    """Fetch everything; write a JSON report of what is where to `out`."""
    fetch_spice_models()
    report = {"spice_jars": str(SPICE_LIB)}
    if weights == "imagenet":
        create_backbone(backbone, "imagenet")
        if backbone in BACKBONES:
            report["backbone_weights"] = f"{torch.hub.get_dir()}/checkpoints ({backbone})"
        else:
            from huggingface_hub.constants import HF_HUB_CACHE

            report["backbone_weights"] = f"{HF_HUB_CACHE} (timm {backbone})"
    write_json(out, report, indent=2)
    print(f"prefetched: {report}", flush=True)
