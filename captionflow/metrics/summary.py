"""The end-of-run summary: each experiment's test metrics, stages side by side, and where
its predictions, checkpoints and logs are; each retrieval model's R@k and mAP.

Printed by the workflow when a run succeeds, so the figures are on screen, not only in
files. Reads the per-stage metrics JSONs that rule `evaluate_job` writes, and the bundle
cards (bundle.json) that rule `export_model_job` writes beside the bundles it advertises.
A run of some targets (`snakemake train_scst`) can leave either behind the checkpoints:
those say so and what refreshes them instead of showing numbers or a bundle to use.
"""

import json
import os

from captionflow.utils.io import file_sha256

# pycocoevalcap's names -> the column headers people quote
# (+ bad_endings: the share of captions that end with a function word, captionflow.metrics.endings)
COLUMNS = {
    "Bleu_4": "BLEU-4",
    "METEOR": "METEOR",
    "ROUGE_L": "ROUGE-L",
    "CIDEr": "CIDEr-D",
    "SPICE": "SPICE",
    "bad_endings": "bad-end",
}


def _rewritten(checkpoint, since, sha256):
    """Whether `checkpoint` was rewritten after the file `since` was made from it, with other
    bytes than `sha256` (a forced rerun may write the same model; None: none recorded, the
    times decide)."""
    if not os.path.exists(checkpoint) or os.path.getmtime(checkpoint) <= os.path.getmtime(since):
        return False
    return sha256 is None or sha256 != file_sha256(checkpoint)


def _stale(report, metrics_path, checkpoint):
    """Whether the metrics are of another model than the checkpoint now at that path."""
    if "checkpoint_sha256" not in report:  # an ensemble's: its members' checkpoints are listed
        return False
    return _rewritten(checkpoint, metrics_path, report["checkpoint_sha256"])


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
                lines.append(
                    f"  {'  reranked':<{width}}  "
                    + "  ".join(cells)
                    + f"  (top {report['reranked']['k']} beams, {report['reranked']['changed']} captions changed)"
                )
            decoding = report.get("decoding", decoding)
            spice = report.get("SPICE_skipped") or spice
            if report.get("reward_signature"):
                signatures.append(f"  {stage} reward: {report['reward_signature']}")
        if decoding:
            lines.append(
                f"  decoding: beam {decoding['beam_size']}, max_len {decoding['max_len']}, alpha {decoding['alpha']}"
            )
        lines += signatures
        if spice:
            lines.append(f"  SPICE skipped: {spice}")
        for stage, paths in stages.items():
            lines.append(
                f"  {stage}: checkpoint {paths['checkpoint']} · predictions {paths['predictions']} · log {paths['log']}"
            )
    return lines


def format_retrieval(metrics):
    """Lines of text with each retrieval model's test figures (percent).

    metrics: {experiment: the metrics JSON evaluate_retrieval writes}. One not evaluated yet
    says so, like a captioning stage, so that a retrieval-only experiment is never missing
    from the summary.
    """
    lines = []
    for name, path in metrics.items():
        if not os.path.exists(path):
            lines += ["", f"{name} retrieval: not evaluated yet (snakemake evaluate_retrieval)"]
            continue
        with open(path) as f:
            r = json.load(f)
        t2i, i2t = r["text_to_image"], r["image_to_text"]
        lines += [
            "",
            f"{name} retrieval ({r['model']}, test): text-to-image R@1 {t2i['R@1']:.1f} "
            f"R@5 {t2i['R@5']:.1f} R@10 {t2i['R@10']:.1f} mAP {t2i['mAP']:.1f}; "
            f"image-to-text R@1 {i2t['R@1']:.1f} ({path})",
        ]
    return lines


def _recorded_checkpoint_sha256(bundle):
    """The checkpoint sha256 in the card beside `bundle` (None: an ensemble's, or no card)."""
    try:
        with open(os.path.join(os.path.dirname(bundle), "bundle.json")) as f:
            return json.load(f)["provenance"]["checkpoint_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def format_bundles(bundles):
    """Lines that advertise each bundle that exists, with the command that captions with it.

    bundles: {bundle path: [the checkpoints it was made from]} (an experiment's last stage;
    an ensemble's members' last stages). A bundle one of those was rewritten after, with
    other bytes than its card records, is of another model: like a stale metric it says so,
    with what refreshes it, instead of offering the command.
    """
    lines = []
    for bundle, checkpoints in bundles.items():
        if not os.path.exists(bundle):
            continue
        sha256 = _recorded_checkpoint_sha256(bundle)
        newer = [c for c in checkpoints if _rewritten(c, bundle, sha256)]
        if newer:
            lines.append(f"  bundle {bundle} older than {newer[0]} (snakemake export_model)")
        else:
            lines.append(f"  captionflow caption IMAGES... --model {os.path.dirname(bundle)}")
    return ["", "Caption your own images with a bundle:", *lines] if lines else []
