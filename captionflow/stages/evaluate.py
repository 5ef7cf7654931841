"""Stage evaluate: caption the test split with a checkpoint and score it (COCO metrics).

Writes the predictions in the COCO results format ([{"image_id", "caption"}]) and a
metrics JSON with BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (pycocoevalcap, PTB-tokenized) and
SPICE when its jars are present (else null, with the reason).
"""

import json
from dataclasses import dataclass

import torch

from captionflow.data.captions import SplitData, read_index
from captionflow.metrics.coco import score_captions
from captionflow.training import checkpoint
from captionflow.training.validation import caption_split
from captionflow.utils.device import resolve_device
from captionflow.utils.io import file_sha256, write_json, write_text
from captionflow.utils.threads import use_threads


@dataclass
class DecodingConfig:
    """Settings of evaluate (an experiment's `evaluate` config section); defaults = the schema's."""

    beam_size: int = 3
    max_len: int = 16
    alpha: float = 0.0
    block_trigrams: bool = False
    device: str = "auto"


def evaluate(checkpoint_path, features, labels_h5, labels_json, references, out_predictions, out_metrics, cfg=DecodingConfig(), split="test", threads=1):
    """Decode `split` with the checkpoint's model and write predictions + metrics."""
    use_threads(threads)
    device = resolve_device(cfg.device)
    vocab_hash = read_index(labels_json)["vocab_hash"]
    model, ckpt = checkpoint.load_model(checkpoint_path, vocab_hash)
    model.to(device)
    data = SplitData(labels_h5, labels_json, features, split, blind=ckpt.get("blind", False))
    checkpoint.check_feature_dim(
        ckpt, checkpoint_path, data.features.feat_dim, f"features {features}",
        "evaluate it on features of the backbone it was trained with (features.backbone), or retrain it on these",
    )  # fmt: skip
    decoding = {"method": "beam", "beam_size": cfg.beam_size, "max_len": cfg.max_len, "alpha": cfg.alpha, "block_trigrams": cfg.block_trigrams}
    captions = caption_split(model, data.features.get, data.image_ids, data.ix_to_word, device, **decoding)
    with open(references) as f:
        refs = json.load(f)[split]
    scores = score_captions({i: refs[str(i)] for i in captions}, captions)
    write_json(out_predictions, [{"image_id": i, "caption": c} for i, c in captions.items()], indent=1)
    report = {
        "checkpoint": str(checkpoint_path),
        "checkpoint_sha256": file_sha256(checkpoint_path),
        "stage": ckpt.get("stage"),
        "reward_signature": ckpt.get("reward_signature"),
        "model": ckpt["model_name"],
        "blind": ckpt.get("blind", False),
        "split": split,
        "decoding": decoding,
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
        lines.append(stage + "\t" + "\t".join("" if rep["metrics"][m] is None else f"{rep['metrics'][m]:.4f}" for m in names))
    write_text(out_table, "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
