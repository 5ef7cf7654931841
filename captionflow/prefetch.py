"""Target prefetch: download, on a machine with internet, what later jobs would fetch.

SPICE's Stanford CoreNLP jars (into pycocoevalcap) and, when features.weights is
`imagenet`, the backbone's torchvision weights (into the torch hub cache, $TORCH_HOME).
Compute nodes without internet then find both on disk.
"""

import torch

from captionflow.features.backbones import create_backbone
from captionflow.metrics.coco import SPICE_LIB, fetch_spice_models
from captionflow.utils.io import write_json


def prefetch(out, backbone, weights):
    """Fetch everything; write a JSON report of what is where to `out`."""
    fetch_spice_models()
    report = {"spice_jars": str(SPICE_LIB)}
    if weights == "imagenet":
        create_backbone(backbone, "imagenet")
        report["backbone_weights"] = f"{torch.hub.get_dir()}/checkpoints ({backbone})"
    write_json(out, report, indent=2)
    print(f"prefetched: {report}", flush=True)
