"""Captioning a whole split and scoring it with CIDEr-D (validation during training)."""

import torch
from pycocoevalcap.cider.cider import Cider

from captionflow.data.karpathy import tokenize
from captionflow.decoding.search import decode, to_words


def caption_split(model, features, image_ids, ix_to_word, device, batch_size=100, **decode_kwargs):
    """Decode every image of a split -> {image_id: caption string}.

    features(rows) -> {"att", "fc"[, "att_mask"]} of those rows (FeatureStore.get, or
    features computed in memory); image_ids[row] names each row.
    """
    model.eval()
    captions = {}
    n = len(image_ids)
    for b in range(0, n, batch_size):
        rows = list(range(b, min(b + batch_size, n)))
        feats = {k: v.to(device) for k, v in features(rows).items()}
        with torch.no_grad():
            seqs, _ = decode(model, feats, **decode_kwargs)
        for row, caption in zip(rows, to_words(seqs, ix_to_word)):
            captions[image_ids[row]] = caption
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


def greedy_cider_d(model, data, references, device, max_len, image_ids=None):
    """The validation score of the feature-fed regimes: greedy captions of SplitData `data`
    (its `image_ids`, or all of them) scored with `cider_d` against `references`."""
    ids = data.image_ids if image_ids is None else image_ids
    captions = caption_split(model, data.features.get, ids, data.ix_to_word, device, method="greedy", max_len=max_len)
    return cider_d(references, captions)
