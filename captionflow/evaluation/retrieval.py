"""Stage evaluate_retrieval: text-to-image and image-to-text R@1/5/10 and mAP of a retrieval
checkpoint on the test split, every caption against every image in one batched scoring
(captionflow.metrics.retrieval); each image is its own identity unless the caption file
gives person ids (person search, CUHK-PEDES: all images of one person match). A model
fine-tuned end to end scores the gallery's features computed from the resized images by
its own backbone (the resize `manifest`)."""

import torch

from captionflow.data.captions import SplitData
from captionflow.metrics.retrieval import both_directions
from captionflow.training.retrieval import gallery_fc, load_retrieval, person_ids, score_split
from captionflow.utils.io import write_json


def evaluate_retrieval(checkpoint_path, features, labels_h5, labels_json, out_metrics=None, split="test", manifest=None):
    """-> {"text_to_image": {"R@1", "R@5", "R@10", "mAP"}, "image_to_text": {...}} in %;
    written to out_metrics (JSON) when given."""
    model, ckpt = load_retrieval(checkpoint_path)
    data = SplitData(labels_h5, labels_json, features, split, ckpt.get("blind", False))
    device = torch.device("cpu")
    scores, text_rows = score_split(model, data, device, fc=gallery_fc(ckpt, data, labels_json, manifest, split, device))
    image_ids = person_ids(data)
    metrics = both_directions(scores, image_ids[text_rows], image_ids)
    report = {
        "checkpoint": str(checkpoint_path), "model": ckpt["model_name"], "split": split, "captions": len(text_rows),
        "images": len(image_ids), "identities": len(set(image_ids.tolist())), "person_search": data.person_ids is not None,
        "end_to_end": "backbone" in ckpt, **metrics,
    }  # fmt: skip
    if out_metrics:
        write_json(out_metrics, report, indent=2)
    t2i, i2t = metrics["text_to_image"], metrics["image_to_text"]
    print(
        f"{split} retrieval ({len(text_rows)} captions x {len(image_ids)} images): text-to-image R@1 {t2i['R@1']:.1f} "
        f"R@5 {t2i['R@5']:.1f} R@10 {t2i['R@10']:.1f} mAP {t2i['mAP']:.1f}; image-to-text R@1 {i2t['R@1']:.1f}",
        flush=True,
    )
    return metrics
