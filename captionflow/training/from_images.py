"""What the end-to-end regimes (finetune_e2e, train_scst_e2e) share: a backbone feeding a
captioner from the resized images, and validation that computes its features the same way."""

import torch
from torch import nn

from captionflow.evaluation.split_captions import caption_split, cider_d
from captionflow.features.backbones import freeze_batchnorm_statistics
from captionflow.features.extract import image_features


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


def val_cider_d(model, files, image_ids, ix_to_word, val_refs, device, max_len):
    """Greedy val CIDEr-D of an EndToEnd model, its features computed from the images."""
    model.eval()
    feats = image_features(model.features, files, device)

    def rows_of(rows):
        return {k: v[torch.as_tensor(rows)] for k, v in feats.items()}

    return cider_d(val_refs, caption_split(model.captioner, rows_of, image_ids, ix_to_word, device, method="greedy", max_len=max_len))
