"""The end-of-run summary: numbers from the metrics files, and no numbers for a stage whose
checkpoint changed after its evaluation."""

import json
import os

from captionflow.metrics.summary import format_bundles, format_retrieval, format_summary
from captionflow.utils.io import file_sha256

METRICS = {"Bleu_4": 0.3171, "METEOR": 0.2062, "ROUGE_L": 0.4894, "CIDEr": 0.7543, "SPICE": None, "bad_endings": 0.125}


def _stage(tmp_path, stage, evaluated=True):
    ckpt = tmp_path / f"{stage}.pt"
    ckpt.write_bytes(b"weights of " + stage.encode())
    paths = {
        "metrics": str(tmp_path / f"{stage}.json"),
        "checkpoint": str(ckpt),
        "predictions": f"p/{stage}.json",
        "log": f"l/{stage}.log",
    }
    if evaluated:
        report = {
            "metrics": METRICS,
            "checkpoint_sha256": file_sha256(ckpt),
            "decoding": {"beam_size": 3, "max_len": 16, "alpha": 0.0},
        }
        if stage == "scst":
            report["reward_signature"] = "reward=CIDEr-D; baseline=greedy"
        (tmp_path / f"{stage}.json").write_text(json.dumps(report))
        os.utime(ckpt, (1, 1))  # written before its evaluation
    return paths


def _row(lines, stage):
    return next(line.split() for line in lines if line.split()[:1] == [stage])


def test_rows_reward_and_paths(tmp_path):
    lines = format_summary(
        {"sat": {s: _stage(tmp_path, s) for s in ("xe", "scst")}, "fc": {"xe": _stage(tmp_path, "fc_xe")}}
    )
    assert "sat (test split)" in lines and "fc (test split)" in lines
    assert _row(lines, "xe") == ["xe", "0.317", "0.206", "0.489", "0.754", "-", "0.125"]
    assert lines[lines.index("sat (test split)") + 1].split()[-1] == "bad-end"
    assert "  scst reward: reward=CIDEr-D; baseline=greedy" in lines
    assert "  scst: checkpoint " + str(tmp_path / "scst.pt") + " · predictions p/scst.json · log l/scst.log" in lines


def test_a_changed_checkpoint_shows_no_numbers_and_a_rewrite_of_the_same_bytes_does(tmp_path):
    stages = {
        "xe": _stage(tmp_path, "xe"),
        "scst": _stage(tmp_path, "scst"),
        "e2e": _stage(tmp_path, "e2e", evaluated=False),
    }
    (tmp_path / "xe.pt").write_bytes(b"weights of xe")  # a forced rerun that wrote the same model
    (tmp_path / "scst.pt").write_bytes(b"other weights")  # retrained to another model, not evaluated again
    lines = format_summary({"sat": stages})
    assert _row(lines, "xe")[4] == "0.754"
    assert " ".join(_row(lines, "scst")).startswith("scst metrics older than")
    assert " ".join(_row(lines, "e2e")) == "e2e not evaluated yet (snakemake evaluate)"


def _bundle(tmp_path, name, checkpoint, at):
    """A bundle exported from `checkpoint` at time `at`, its card recording the checkpoint's sha256."""
    export = tmp_path / name / "export"
    export.mkdir(parents=True)
    (export / "bundle.pt").write_bytes(b"bundle of " + name.encode())
    (export / "bundle.json").write_text(json.dumps({"provenance": {"checkpoint_sha256": file_sha256(checkpoint)}}))
    os.utime(export / "bundle.pt", (at, at))
    return str(export / "bundle.pt")


def test_a_bundle_older_than_a_retrained_checkpoint_is_marked_like_a_stale_metric(tmp_path):
    ckpt = {name: tmp_path / f"{name}.pt" for name in ("fresh", "same", "retrained")}
    for name, path in ckpt.items():
        path.write_bytes(b"weights of " + name.encode())
        os.utime(path, (100, 100))
    bundles = {name: _bundle(tmp_path, name, ckpt[name], at=200) for name in ckpt}
    bundles["ens"] = _bundle(tmp_path, "ens", ckpt["fresh"], at=200)
    (tmp_path / "ens/export/bundle.json").write_text(json.dumps({"provenance": {"checkpoint_sha256": None}}))
    ckpt["same"].write_bytes(b"weights of same")  # a forced rerun that wrote the same model, after the export
    ckpt["retrained"].write_bytes(b"other weights")  # retrained, not exported again
    lines = format_bundles(
        {
            bundles["fresh"]: [str(ckpt["fresh"])],
            bundles["same"]: [str(ckpt["same"])],
            bundles["retrained"]: [str(ckpt["retrained"])],
            bundles["ens"]: [str(ckpt["fresh"]), str(ckpt["retrained"])],  # an ensemble: its members' checkpoints
            str(tmp_path / "never/export/bundle.pt"): [str(ckpt["fresh"])],  # not exported: not advertised
        }
    )
    assert lines == [
        "",
        "Caption your own images with a bundle:",
        f"  captionflow caption IMAGES... --model {tmp_path / 'fresh/export'}",
        f"  captionflow caption IMAGES... --model {tmp_path / 'same/export'}",
        f"  bundle {bundles['retrained']} older than {ckpt['retrained']} (snakemake export_model)",
        f"  bundle {bundles['ens']} older than {ckpt['retrained']} (snakemake export_model)",
    ]
    assert format_bundles({str(tmp_path / "never/export/bundle.pt"): [str(ckpt["fresh"])]}) == []


def test_retrieval_lines_show_the_file_figures_and_a_model_not_evaluated_yet(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(
        json.dumps(
            {
                "model": "gna_rnn",
                "text_to_image": {"R@1": 12.345, "R@5": 50.0, "R@10": 75.0, "mAP": 30.06},
                "image_to_text": {"R@1": 20.0, "R@5": 60.0, "R@10": 80.0, "mAP": 40.0},
            }
        )
    )
    lines = format_retrieval({"r": str(path), "q": str(tmp_path / "missing.json")})
    assert lines == [
        "",
        f"r retrieval (gna_rnn, test): text-to-image R@1 12.3 R@5 50.0 R@10 75.0 mAP 30.1; image-to-text R@1 20.0 ({path})",
        "",
        "q retrieval: not evaluated yet (snakemake evaluate_retrieval)",
    ]
