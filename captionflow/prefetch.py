"""Target prefetch: download, on a machine with internet, what the run's jobs would fetch.

One job per download the config needs (rules/prefetch.smk decides which, so a dry run
lists them): SPICE's Stanford CoreNLP jars (into pycocoevalcap) when anything is
evaluated; the backbone's pretrained weights when `features.weights` is `imagenet`
(torchvision's into the torch hub cache, $TORCH_HOME; timm's into the Hugging Face hub
cache, $HF_HOME) or the detector's COCO weights with `coco`. Compute nodes without
internet then find all of them on disk (export the same variables there). Each job writes
a small JSON report (what, where, whether it was downloaded now) and says it in one line.
"""

import json
import os

import torch

from captionflow.features.backbones import BACKBONES, create_backbone
from captionflow.metrics.coco import SPICE_JARS, SPICE_LIB, fetch_spice_models
from captionflow.utils.io import write_json

DETECTOR = "fasterrcnn_resnet50_fpn"


def weights_location(backbone):
    """Where the pretrained weights of `backbone` land: a file (torchvision) or a hub folder (timm)."""
    import torchvision

    if backbone == DETECTOR:
        url = torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights.DEFAULT.url
    elif backbone in BACKBONES:
        url = torchvision.models.get_model_weights(backbone).DEFAULT.url
    else:
        import timm
        from huggingface_hub.constants import HF_HUB_CACHE

        repo = timm.models.get_pretrained_cfg(backbone).hf_hub_id
        return os.path.join(HF_HUB_CACHE, "models--" + repo.replace("/", "--"))
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def _report(out, what, where, present_before):
    report = {"what": what, "where": where, "downloaded": not present_before}
    write_json(out, report, indent=2)
    print(f"prefetch: {what}: {'downloaded into' if not present_before else 'already in'} {where}", flush=True)
    return report


def prefetch_weights(out, backbone, weights):
    """Fetch `backbone`'s pretrained weights (`weights`: imagenet, or coco for the detector)."""
    where = weights_location(backbone)
    present = os.path.exists(where)
    if backbone == DETECTOR:
        from captionflow.features.regions import create_detector

        create_detector(weights="coco")
        what = f"{backbone} COCO weights"
    else:
        create_backbone(backbone, "imagenet")
        what = f"{backbone} ImageNet weights"
    return _report(out, what, where, present)


def prefetch_spice(out):
    """Fetch SPICE's Stanford CoreNLP 3.6.0 jars into pycocoevalcap's folder."""
    present = all((SPICE_LIB / jar).is_file() for jar in SPICE_JARS)
    fetch_spice_models()
    return _report(out, "SPICE's Stanford CoreNLP 3.6.0 jars", str(SPICE_LIB), present)


def summarise(reports, out):
    """The prefetch target: every download's report in one file, and on the console."""
    merged = []
    for path in reports:
        with open(path) as f:
            merged.append(json.load(f))
    write_json(out, merged, indent=2)
    print(f"prefetch: {len(merged)} download(s) for this config, all on disk (list in {out}):", flush=True)
    for r in merged:
        print(f"  {r['what']}: {r['where']}", flush=True)
