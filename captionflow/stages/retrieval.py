"""Stage evaluate_retrieval: text-to-image and image-to-text R@1/5/10 and mAP of a retrieval
checkpoint on the test split, every caption against every image in one batched scoring
(captionflow.metrics.retrieval); each image is its own identity unless ids are given (person
search: all images of one person match)."""

import torch

from captionflow.data.captions import SplitData
from captionflow.metrics.retrieval import both_directions
from captionflow.training.retrieval import load_retrieval, score_split
from captionflow.utils.io import write_json


def evaluate_retrieval(checkpoint_path, features, labels_h5, labels_json, out_metrics=None, split="test", ids=None):
    """-> {"text_to_image": {"R@1", "R@5", "R@10", "mAP"}, "image_to_text": {...}} in %;
    written to out_metrics (JSON) when given. ids: each image row's identity."""
    model, ckpt = load_retrieval(checkpoint_path)
    data = SplitData(labels_h5, labels_json, features, split, ckpt.get("blind", False))
    scores, text_rows = score_split(model, data, torch.device("cpu"))
    image_ids = torch.arange(len(data.features)) if ids is None else torch.as_tensor(ids)
    metrics = both_directions(scores, image_ids[text_rows], image_ids)
    report = {"checkpoint": str(checkpoint_path), "model": ckpt["model_name"], "split": split, "captions": len(text_rows), "images": len(image_ids), **metrics}
    if out_metrics:
        write_json(out_metrics, report, indent=2)
    t2i, i2t = metrics["text_to_image"], metrics["image_to_text"]
    print(
        f"{split} retrieval ({len(text_rows)} captions x {len(image_ids)} images): text-to-image R@1 {t2i['R@1']:.1f} "
        f"R@5 {t2i['R@5']:.1f} R@10 {t2i['R@10']:.1f} mAP {t2i['mAP']:.1f}; image-to-text R@1 {i2t['R@1']:.1f}",
        flush=True,
    )
    return metrics
