"""Captioning a whole split and scoring it with CIDEr-D (validation during training)."""

import torch
from pycocoevalcap.cider.cider import Cider

from captionflow.data.karpathy import tokenize
from captionflow.decoding.search import decode, to_words


def caption_split(model, data, device, batch_size=100, **decode_kwargs):
    """Decode every image of `data` (a SplitData) -> {image_id: caption string}."""
    model.eval()
    captions = {}
    n = len(data.image_ids)
    for b in range(0, n, batch_size):
        rows = list(range(b, min(b + batch_size, n)))
        feats = {k: v.to(device) for k, v in data.features.get(rows).items()}
        with torch.no_grad():
            seqs, _ = decode(model, feats, **decode_kwargs)
        for row, caption in zip(rows, to_words(seqs, data.ix_to_word)):
            captions[data.image_ids[row]] = caption
    return captions


def cider_d(references, captions):
    """pycocoevalcap's CIDEr-D of captions {id: str} against raw references {id: [str]}.

    References are lower-cased and split into words (no Java tokenizer): a fast proxy for
    model selection; the evaluate stage reports the official PTB-tokenized metrics.
    """
    gts = {i: [" ".join(tokenize(r)) for r in references[str(i)]] for i in captions}
    res = {i: [c] for i, c in captions.items()}
    score, _ = Cider().compute_score(gts, res)
    return float(score)
