"""Stage evaluate: caption the test split with a checkpoint and score it (COCO metrics).

Writes the predictions in the COCO results format ([{"image_id", "caption"}], plus each
image's "file_path" in the caption file) and a
metrics JSON with BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (pycocoevalcap, PTB-tokenized),
SPICE when its jars are present (else null, with the reason), and bad_endings (the share of
captions that end with a function word, captionflow.metrics.endings).
"""

import json
from dataclasses import dataclass
from typing import ClassVar

import torch

from captionflow.config import build
from captionflow.data.captions import SplitData, read_labels_json
from captionflow.decoding.ensemble import Ensemble, member_feats
from captionflow.decoding.search import beam_candidates, to_words, until_end
from captionflow.evaluation.retrieval import gallery_fc, load_retrieval
from captionflow.evaluation.split_captions import caption_split
from captionflow.metrics.coco import score_captions
from captionflow.metrics.endings import bad_endings
from captionflow.models import checkpoint
from captionflow.utils.device import resolve_device
from captionflow.utils.io import file_sha256, write_json, write_text
from captionflow.utils.precision import Precision
from captionflow.utils.threads import use_threads


@dataclass
class DecodingConfig:
    """Settings of evaluate: an experiment's or ensemble's `evaluate` config section (no
    defaults here: captionflow.config.build fills them from the schema)."""

    SECTION: ClassVar[str] = "evaluate"

    beam_size: int
    max_len: int
    alpha: float
    block_trigrams: bool
    rerank_k: int  # 0: no reranking; k: rerank the k best beams with a retrieval model
    rerank_weight: float
    rerank_model: str  # the experiment whose retrieval model reranks; "": this one's
    precision: str  # fp32 | bf16 | fp16: the decoder's forward (captionflow.utils.precision)
    device: str


def evaluate(
    checkpoint_path,
    features,
    labels_h5,
    labels_json,
    references,
    out_predictions,
    out_metrics,
    cfg=None,
    split="test",
    threads=1,
    retrieval=None,
    retrieval_features=None,
    retrieval_manifest=None,
):
    """Decode `split` with the checkpoint's model and write predictions + metrics.

    With cfg.rerank_k, the k best beams of each image are also reranked by
    beam score + rerank_weight x the retrieval checkpoint's affinity logit (its own frozen
    features, `retrieval_features`, or for one fine-tuned end to end the images of
    `retrieval_manifest`), and those metrics are reported beside the plain ones."""
    cfg = cfg or build(DecodingConfig)  # the schema's evaluate defaults
    use_threads(threads)
    device = resolve_device(cfg.device)
    precision = Precision(cfg.precision, device, "evaluate.precision")
    model, ckpt, data = _load_member(checkpoint_path, features, labels_h5, labels_json, split, device)
    with precision.autocast():
        captions = caption_split(model, data.features.get, data.image_ids, data.ix_to_word, device, **_decoding(cfg))
    about = {
        "checkpoint": str(checkpoint_path),
        "checkpoint_sha256": file_sha256(checkpoint_path),
        "stage": ckpt.get("stage"),
        "reward_signature": ckpt.get("reward_signature"),
        "model": ckpt["model_name"],
        "blind": ckpt.get("blind", False),
    }
    if cfg.rerank_k:
        ret_model, ret_ckpt = load_retrieval(retrieval)
        fc = gallery_fc(
            ret_ckpt,
            SplitData(labels_h5, labels_json, retrieval_features, split),
            labels_json,
            retrieval_manifest,
            split,
            torch.device("cpu"),
        )
        with precision.autocast():
            reranked = _reranked(model, data, device, cfg, ret_model, fc)
        with open(references) as f:
            refs = json.load(f)[split]
        scores = {
            **score_captions({i: refs[str(i)] for i in reranked}, reranked),
            "bad_endings": bad_endings(reranked.values()),
        }
        about["reranked"] = {
            "retrieval": str(retrieval),
            "k": cfg.rerank_k,
            "weight": cfg.rerank_weight,
            "metrics": {k: v for k, v in scores.items() if k not in ("SPICE_skipped", "num_images")},
            "changed": sum(reranked[i] != captions[i] for i in captions),
        }
    _write_results(captions, labels_json, references, split, cfg, about, out_predictions, out_metrics)


def _reranked(model, data, device, cfg, ret_model, fc, batch=100):
    """{image_id: caption}: the best of the k best beams by beam score + weight x affinity.
    fc: the retrieval model's image features of the split's rows (M, D)."""
    k = cfg.rerank_k
    captions = {}
    for b in range(0, len(data.image_ids), batch):
        rows = list(range(b, min(b + batch, len(data.image_ids))))
        feats = {name: v.to(device) for name, v in data.features.get(rows).items()}
        seqs, beam_scores = beam_candidates(
            model, feats, max(cfg.beam_size, k), cfg.max_len, cfg.alpha, cfg.block_trigrams
        )
        seqs, beam_scores = seqs[:, :k].cpu(), beam_scores[:, :k].cpu()
        words = until_end(seqs.reshape(-1, seqs.shape[-1]))
        lengths = torch.tensor([max(1, len(w)) for w in words])
        tokens = torch.zeros(len(words), int(lengths.max()), dtype=torch.long)
        for i, w in enumerate(words):
            tokens[i, : len(w)] = torch.tensor(w, dtype=torch.long)
        with torch.no_grad():
            affinity = ret_model(tokens, lengths, fc[rows].repeat_interleave(k, dim=0)).view(len(rows), k)
        best = (beam_scores + cfg.rerank_weight * affinity).argmax(dim=1)
        chosen = seqs[torch.arange(len(rows)), best]
        for row, caption in zip(rows, to_words(chosen, data.ix_to_word)):
            captions[data.image_ids[row]] = caption
    return captions


def evaluate_ensemble(
    checkpoints,
    features,
    labels_h5,
    labels_json,
    references,
    out_predictions,
    out_metrics,
    cfg=None,
    split="test",
    threads=1,
):
    """Decode `split` with the members' checkpoints together (captionflow.decoding.ensemble),
    each member reading its own features (features[i] for checkpoints[i])."""
    cfg = cfg or build(DecodingConfig)  # the schema's evaluate defaults
    use_threads(threads)
    device = resolve_device(cfg.device)
    members = [_load_member(c, f, labels_h5, labels_json, split, device) for c, f in zip(checkpoints, features)]
    ensemble = Ensemble([model for model, _, _ in members])

    def rows_of(rows):
        return member_feats([data.features.get(rows) for _, _, data in members])

    data = members[0][2]
    captions = caption_split(ensemble, rows_of, data.image_ids, data.ix_to_word, device, **_decoding(cfg))
    about = {
        "members": [
            {
                "checkpoint": str(c),
                "checkpoint_sha256": file_sha256(c),
                "model": ckpt["model_name"],
                "stage": ckpt.get("stage"),
            }
            for c, (_, ckpt, _) in zip(checkpoints, members)
        ],
        "stage": "ensemble",
        "model": "ensemble of " + ", ".join(ckpt["model_name"] for _, ckpt, _ in members),
    }
    _write_results(captions, labels_json, references, split, cfg, about, out_predictions, out_metrics)


def _load_member(checkpoint_path, features, labels_h5, labels_json, split, device):
    """A checkpoint's model on `device` and the split's data with its features, checked to fit."""
    vocab_hash = read_labels_json(labels_json)["vocab_hash"]
    model, ckpt = checkpoint.load_model(checkpoint_path, vocab_hash)
    model.to(device)
    data = SplitData(labels_h5, labels_json, features, split, blind=ckpt.get("blind", False))
    checkpoint.check_feature_dim(
        ckpt,
        checkpoint_path,
        data.features.feat_dim,
        f"features {features}",
        "evaluate it on features of the backbone it was trained with (features.backbone), or retrain it on these",
    )
    return model, ckpt, data


def _decoding(cfg):
    return {
        "method": "beam",
        "beam_size": cfg.beam_size,
        "max_len": cfg.max_len,
        "alpha": cfg.alpha,
        "block_trigrams": cfg.block_trigrams,
    }


def _write_results(captions, labels_json, references, split, cfg, about, out_predictions, out_metrics):
    """Score captions {image_id: str} and write the predictions (COCO results format, plus
    each image's file_path) and the metrics report (`about` first)."""
    with open(references) as f:
        refs = json.load(f)[split]
    scores = {
        **score_captions({i: refs[str(i)] for i in captions}, captions),
        "bad_endings": bad_endings(captions.values()),
    }
    files = {img["id"]: img.get("file_path") for img in read_labels_json(labels_json)["images"]}
    write_json(
        out_predictions,
        [{"image_id": i, "caption": c, "file_path": files.get(i)} for i, c in captions.items()],
        indent=1,
    )
    report = {
        **about,
        "split": split,
        "decoding": _decoding(cfg),
        "metrics": {k: v for k, v in scores.items() if k not in ("SPICE_skipped", "num_images")},
        "SPICE_skipped": scores["SPICE_skipped"],
        "num_images": scores["num_images"],
    }
    write_json(out_metrics, report, indent=2)
    summary = ", ".join(f"{k} {v:.4f}" for k, v in report["metrics"].items() if v is not None)
    print(f"{split} ({len(captions)} images, beam {cfg.beam_size}): {summary}", flush=True)
    if report["SPICE_skipped"]:
        print(f"SPICE skipped: {report['SPICE_skipped']}", flush=True)


def report_stages(stage_reports, out_json, out_table):
    """Put an experiment's per-stage test reports side by side: JSON and a TSV table.

    stage_reports: {stage: metrics JSON path} in stage order (xe, scst, ...).
    """
    reports = {}
    for stage, path in stage_reports.items():
        with open(path) as f:
            reports[stage] = json.load(f)
    first = next(iter(reports.values()))
    names = list(first["metrics"])
    write_json(out_json, {"split": first["split"], "stages": reports}, indent=2)
    lines = ["stage\t" + "\t".join(names)]
    for stage, rep in reports.items():
        lines.append(
            stage + "\t" + "\t".join("" if rep["metrics"].get(m) is None else f"{rep['metrics'][m]:.4f}" for m in names)
        )
    write_text(out_table, "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
