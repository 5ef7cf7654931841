"""Stage evaluate_retrieval: text-to-image and image-to-text R@1/5/10 and mAP of a retrieval
checkpoint on the test split, every caption against every image in one batched scoring
(captionflow.metrics.retrieval); each image is its own identity unless the caption file
gives person ids (person search, CUHK-PEDES: all images of one person match). A model
fine-tuned end to end scores the gallery's features computed from the resized images by
its own backbone (the resize `manifest`).

Also what train_retrieval validates with and evaluate reranks with: loading a retrieval
checkpoint, the gallery's features, and scoring every caption against every image."""

import numpy as np
import torch

from captionflow.data.captions import SplitData
from captionflow.errors import CaptionflowError
from captionflow.features.backbones import Backbone
from captionflow.features.extract import ImageFiles, image_features, split_images
from captionflow.metrics.retrieval import both_directions
from captionflow.models import checkpoint
from captionflow.models.retrieval import GNA_RNN_VERSION, create_retrieval_model
from captionflow.utils.io import write_json
from captionflow.utils.state import load_checked


def evaluate_retrieval(
    checkpoint_path, features, labels_h5, labels_json, out_metrics=None, split="test", manifest=None
):
    """-> {"text_to_image": {"R@1", "R@5", "R@10", "mAP"}, "image_to_text": {...}} in %;
    written to out_metrics (JSON) when given."""
    model, ckpt = load_retrieval(checkpoint_path)
    data = SplitData(labels_h5, labels_json, features, split, ckpt.get("blind", False))
    device = torch.device("cpu")
    scores, text_rows = score_split(
        model, data, device, fc=gallery_fc(ckpt, data, labels_json, manifest, split, device)
    )
    image_ids = person_ids(data)
    metrics = both_directions(scores, image_ids[text_rows], image_ids)
    report = {
        "checkpoint": str(checkpoint_path),
        "model": ckpt["model_name"],
        "split": split,
        "captions": len(text_rows),
        "images": len(image_ids),
        "identities": len(set(image_ids.tolist())),
        "person_search": data.person_ids is not None,
        "end_to_end": "backbone" in ckpt,
        **metrics,
    }
    if out_metrics:
        write_json(out_metrics, report, indent=2)
    t2i, i2t = metrics["text_to_image"], metrics["image_to_text"]
    print(
        f"{split} retrieval ({len(text_rows)} captions x {len(image_ids)} images): text-to-image R@1 {t2i['R@1']:.1f} "
        f"R@5 {t2i['R@5']:.1f} R@10 {t2i['R@10']:.1f} mAP {t2i['mAP']:.1f}; image-to-text R@1 {i2t['R@1']:.1f}",
        flush=True,
    )
    return metrics


def caption_tensors(data, items):
    """Caption items of a split -> tokens (N, T), lengths (N,), image rows (N,)."""
    lengths = torch.from_numpy(data.lengths[items].astype(np.int64))
    tokens = data.labels[torch.from_numpy(data.caption_rows[items])][:, : int(lengths.max())]
    return tokens, lengths, data.caption_image[items]


def person_ids(data):
    """Each image row's identity: the caption file's person ids, else the row itself."""
    return torch.as_tensor(data.person_ids) if data.person_ids is not None else torch.arange(len(data.image_ids))


def gallery_fc(ckpt, data, labels_json, manifest, split, device):
    """fc (M, D) of a split's images for a retrieval checkpoint: from the feature file, or,
    for an end-to-end checkpoint (it carries its backbone), from the resized images."""
    if "backbone" not in ckpt:
        return data.features.pooled()
    if manifest is None:
        raise CaptionflowError(
            "this retrieval model was fine-tuned end to end: its gallery features come from the resized images, so the resize manifest is needed"
        )
    spec = ckpt["backbone_spec"]  # the Backbone it was fine-tuned from, as a dict
    splits, size = split_images(labels_json, manifest)
    if size != spec["image_size"]:
        raise CaptionflowError(
            f"the images are resized to {size} px but the retrieval model's backbone was fine-tuned on {spec['image_size']} px; retrain train_retrieval"
        )
    grid = Backbone(**{**spec, "weights": "none"}).build()  # its fine-tuned weights come next
    load_checked(grid.backbone, ckpt["backbone"], "retrieval checkpoint", f"backbone {spec['name']}")
    return image_features(grid.to(device), ImageFiles(splits[split][1], size), device)["fc"]


@torch.no_grad()
def score_split(model, data, device, fc=None, batch=256):
    """Every caption of a split against every image -> logits (captions, images), the
    captions' image rows. fc: the images' features (M, D), else the split's feature file."""
    model.eval()
    fc = (data.features.pooled() if fc is None else fc).to(device)
    scores, rows = [], []
    for b in range(0, len(data.caption_rows), batch):
        tokens, lengths, image_rows = caption_tensors(data, np.arange(b, min(b + batch, len(data.caption_rows))))
        scores.append(model.score_gallery(tokens.to(device), lengths.to(device), fc).cpu())
        rows.append(torch.from_numpy(np.asarray(image_rows)))
    return torch.cat(scores), torch.cat(rows)


def load_retrieval(path):
    """-> (model in eval mode, checkpoint dict); refuses a checkpoint of another stage."""
    ckpt = checkpoint.load(path)
    if ckpt.get("stage") != "retrieval":
        raise CaptionflowError(
            f"checkpoint {path} is not a retrieval model's (stage {ckpt.get('stage')!r}); give results/<experiment>/retrieval/model.pt"
        )
    if ckpt["model_name"] == "gna_rnn" and ckpt.get("gna_rnn_version") != GNA_RNN_VERSION:
        raise CaptionflowError(
            f"retrieval checkpoint {path} holds the factorised GNA-RNN, now named gna_rnn_factorised (gna_rnn is the published network): set retrieval.model: gna_rnn_factorised and retrain"
        )
    model = create_retrieval_model(ckpt["model_name"], **ckpt["model_args"])
    load_checked(model, ckpt["model"], path, f"retrieval model {ckpt['model_name']}")
    return model.eval(), ckpt
