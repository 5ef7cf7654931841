"""The end-of-run summary: each experiment's test metrics, stages side by side, and where
its predictions, checkpoints and logs are.

Printed by the workflow when a run succeeds, so the figures are on screen, not only in
files. Reads the per-stage metrics JSONs that rule `evaluate_job` writes.
"""

import json
import os

from captionflow.utils.io import file_sha256

# pycocoevalcap's names -> the column headers people quote
COLUMNS = {"Bleu_4": "BLEU-4", "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr-D", "SPICE": "SPICE"}


def _stale(report, metrics_path, checkpoint):
    """Whether the metrics are of another model than the checkpoint now at that path: it
    was rewritten after them with other bytes (a forced rerun may write the same model)."""
    if "checkpoint_sha256" not in report:  # an ensemble's: its members' checkpoints are listed
        return False
    if not os.path.exists(checkpoint) or os.path.getmtime(checkpoint) <= os.path.getmtime(metrics_path):
        return False
    return report.get("checkpoint_sha256") != file_sha256(checkpoint)


def format_summary(experiments):
    """Lines of text summarising every experiment.

    experiments: {name: {stage: {"metrics", "checkpoint", "predictions", "log"} paths}},
    stages in training order. A stage not evaluated yet, or whose checkpoint changed after
    its metrics were written, says so instead of showing numbers.
    """
    lines = []
    width = max([len(s) for stages in experiments.values() for s in stages] + [5])
    for name, stages in experiments.items():
        header = f"  {'stage':<{width}}  " + "  ".join(f"{c:>7}" for c in COLUMNS.values())
        lines += ["", f"{name} (test split)", header]
        signatures, decoding, spice = [], None, None
        for stage, paths in stages.items():
            if not os.path.exists(paths["metrics"]):
                lines.append(f"  {stage:<{width}}  not evaluated yet (snakemake evaluate)")
                continue
            with open(paths["metrics"]) as f:
                report = json.load(f)
            if _stale(report, paths["metrics"], paths["checkpoint"]):
                lines.append(f"  {stage:<{width}}  metrics older than {paths['checkpoint']} (snakemake evaluate)")
                continue
            scores = report["metrics"]
            cells = ["      -" if scores.get(k) is None else f"{scores[k]:7.3f}" for k in COLUMNS]
            lines.append(f"  {stage:<{width}}  " + "  ".join(cells))
            if report.get("reranked"):
                again = report["reranked"]["metrics"]
                cells = ["      -" if again.get(k) is None else f"{again[k]:7.3f}" for k in COLUMNS]
                lines.append(f"  {'  reranked':<{width}}  " + "  ".join(cells) + f"  (top {report['reranked']['k']} beams, {report['reranked']['changed']} captions changed)")
            decoding = report.get("decoding", decoding)
            spice = report.get("SPICE_skipped") or spice
            if report.get("reward_signature"):
                signatures.append(f"  {stage} reward: {report['reward_signature']}")
        if decoding:
            lines.append(f"  decoding: beam {decoding['beam_size']}, max_len {decoding['max_len']}, alpha {decoding['alpha']}")
        lines += signatures
        if spice:
            lines.append(f"  SPICE skipped: {spice}")
        for stage, paths in stages.items():
            lines.append(f"  {stage}: checkpoint {paths['checkpoint']} · predictions {paths['predictions']} · log {paths['log']}")
    return lines
