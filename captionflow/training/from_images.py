"""What the end-to-end regimes (finetune_e2e, train_scst_e2e) share: a backbone feeding a
captioner from the resized images, set up and optimised alike, and validation that computes
its features the same way."""

import torch
from torch import nn

from captionflow.errors import CaptionflowError
from captionflow.evaluation.split_captions import caption_split, cider_d
from captionflow.features.backbones import freeze_batchnorm_statistics, freeze_leading_stages
from captionflow.features.extract import ImageFiles, backbone_images, image_features
from captionflow.models import checkpoint
from captionflow.utils.precision import make_optimizer


class EndToEnd(nn.Module):
    """GridFeatures (the extraction code path) feeding a captioner: images -> log-probs.
    BatchNorm statistics of the backbone stay frozen in training (small batches)."""

    def __init__(self, features, captioner):
        super().__init__()
        self.features = features
        self.captioner = captioner

    def train(self, mode=True):
        super().train(mode)
        freeze_batchnorm_statistics(self.features)
        return self


def end_to_end_model(backbone, init_checkpoint, vocab_hash, cfg, device, needs, fix):
    """-> (EndToEnd on `device`, the init checkpoint dict): the captioner of `init_checkpoint`
    fed by the network `backbone` (a Backbone) builds, its first cfg.freeze_stages stages
    frozen. The global RNG is seeded with cfg.seed before the network is built.

    needs: what refuses an image-blind checkpoint ("end-to-end SCST"); fix: what to do when
    the backbone's feature size is not the one the checkpoint was trained on."""
    captioner, init = checkpoint.load_model(init_checkpoint, vocab_hash)
    if init.get("blind"):
        raise CaptionflowError(f"{init_checkpoint} is an image-blind model: {needs} needs the image")
    torch.manual_seed(cfg.seed)
    features = backbone.build()
    checkpoint.check_feature_dim(
        init, init_checkpoint, features.backbone.out_dim, f"backbone {backbone.name} (features.backbone)", fix
    )
    freeze_leading_stages(features.backbone, cfg.freeze_stages)
    return EndToEnd(features, captioner).to(device), init


def end_to_end_images(backbone, labels_json, manifest):
    """-> ({split: (ids, paths)}, {"train", "val": ImageFiles}): the resized images the
    backbone runs on (of the side it is set for), in labels-JSON order."""
    splits = backbone_images(backbone, labels_json, manifest)
    return splits, {s: ImageFiles(splits[s][1], backbone.image_size) for s in ("train", "val")}


def end_to_end_optimizer(model, cfg, device, where):
    """cfg.optimizer (make_optimizer) over two parameter groups of an EndToEnd: its trainable
    backbone parameters at cfg.backbone_lr (much lower) and its captioner's at cfg.lr, both
    with cfg.weight_decay. where: the config section, for errors."""
    return make_optimizer(
        [
            {"params": [p for p in model.features.parameters() if p.requires_grad], "lr": cfg.backbone_lr},
            {"params": list(model.captioner.parameters()), "lr": cfg.lr},
        ],
        device,
        cfg,
        where,
    )


def val_cider_d(model, files, image_ids, ix_to_word, val_refs, device, max_len):
    """Greedy val CIDEr-D of an EndToEnd model, its features computed from the images."""
    model.eval()
    feats = image_features(model.features, files, device)

    def rows_of(rows):
        return {k: v[torch.as_tensor(rows)] for k, v in feats.items()}

    return cider_d(
        val_refs,
        caption_split(model.captioner, rows_of, image_ids, ix_to_word, device, method="greedy", max_len=max_len),
    )
