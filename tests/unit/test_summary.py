"""The end-of-run summary: numbers from the metrics files, and no numbers for a stage whose
checkpoint changed after its evaluation."""

import json
import os

from captionflow.metrics.summary import format_summary
from captionflow.utils.io import file_sha256

METRICS = {"Bleu_4": 0.3171, "METEOR": 0.2062, "ROUGE_L": 0.4894, "CIDEr": 0.7543, "SPICE": None}


def _stage(tmp_path, stage, evaluated=True):
    ckpt = tmp_path / f"{stage}.pt"
    ckpt.write_bytes(b"weights of " + stage.encode())
    paths = {"metrics": str(tmp_path / f"{stage}.json"), "checkpoint": str(ckpt), "predictions": f"p/{stage}.json", "log": f"l/{stage}.log"}
    if evaluated:
        report = {"metrics": METRICS, "checkpoint_sha256": file_sha256(ckpt), "decoding": {"beam_size": 3, "max_len": 16, "alpha": 0.0}}
        if stage == "scst":
            report["reward_signature"] = "reward=CIDEr-D; baseline=greedy"
        (tmp_path / f"{stage}.json").write_text(json.dumps(report))
        os.utime(ckpt, (1, 1))  # written before its evaluation
    return paths


def _row(lines, stage):
    return next(line.split() for line in lines if line.split()[:1] == [stage])


def test_rows_reward_and_paths(tmp_path):
    lines = format_summary({"sat": {s: _stage(tmp_path, s) for s in ("xe", "scst")}, "fc": {"xe": _stage(tmp_path, "fc_xe")}})
    assert "sat (test split)" in lines and "fc (test split)" in lines
    assert _row(lines, "xe") == ["xe", "0.317", "0.206", "0.489", "0.754", "-"]
    assert "  scst reward: reward=CIDEr-D; baseline=greedy" in lines
    assert "  scst: checkpoint " + str(tmp_path / "scst.pt") + " · predictions p/scst.json · log l/scst.log" in lines


def test_a_changed_checkpoint_shows_no_numbers_and_a_rewrite_of_the_same_bytes_does(tmp_path):
    stages = {"xe": _stage(tmp_path, "xe"), "scst": _stage(tmp_path, "scst"), "e2e": _stage(tmp_path, "e2e", evaluated=False)}
    (tmp_path / "xe.pt").write_bytes(b"weights of xe")  # a forced rerun that wrote the same model
    (tmp_path / "scst.pt").write_bytes(b"other weights")  # retrained to another model, not evaluated again
    lines = format_summary({"sat": stages})
    assert _row(lines, "xe")[4] == "0.754"
    assert " ".join(_row(lines, "scst")).startswith("scst metrics older than")
    assert " ".join(_row(lines, "e2e")) == "e2e not evaluated yet (snakemake evaluate)"
