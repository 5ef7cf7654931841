"""bench/gpu_check.py (`make gpu-check`): its tiny CPU version passes, and a check fails when it should."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"
ROWS = [
    ("XE steps/s, fp32", "ExpansionNet v2"),
    ("XE steps/s, bf16", "ExpansionNet v2"),
    ("XE steps/s, bf16+compile", "ExpansionNet v2"),
    ("XE steps/s, fp32", "AoANet"),
    ("XE steps/s, bf16", "AoANet"),
    ("SCST steps/s, fp32", "ExpansionNet v2"),
    ("SCST steps/s, fp32", "AoANet"),
    ("beam-3 images/s, fp32", "ExpansionNet v2"),
    ("beam-3 images/s, bf16", "ExpansionNet v2"),
    ("beam-3 images/s, fp32", "AoANet"),
    ("beam-3 images/s, bf16", "AoANet"),
    ("extraction images/s, bare forward", "resnet18"),
    ("extraction images/s, extract_features", "resnet18"),
    ("feature store batches/s", "SplitData"),
]


def _script():
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports bench_data from its folder
    try:
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


@pytest.mark.slow  # one inductor compile on the CPU: ~20 s with a warm cache, ~55 s cold
@pytest.mark.timeout(600)
def test_tiny_cpu_version_passes_every_check_and_fills_the_table(tmp_path):
    out = tmp_path / "gpu_check.md"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--seconds", "0.2", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = out.read_text()
    checks = re.findall(r"^- (PASS|FAIL|SKIP) (.*)$", text, flags=re.M)
    assert len(checks) == 10 and not [c for c in checks if c[0] == "FAIL"]
    skipped = {name.split(":")[0]: name for status, name in checks if status == "SKIP"}
    assert set(skipped) == {"fp16 vs fp32 XE loss (ExpansionNet v2)", "DDP step, nccl"}
    assert all("needs CUDA" in line for line in skipped.values())  # a reason, not a bare SKIP
    for status, line in checks:
        assert status == "SKIP" or "tolerance" in line  # the measured value and its tolerance
    cells = {
        tuple(c.strip() for c in row.split("|")[1:3]): row.split("|")[3].strip()
        for row in text.splitlines()
        if row.startswith("| ") and "---" not in row
    }
    for row in ROWS:
        assert float(cells[row]) > 0, row
    assert cells[("XE steps/s, bf16+compile", "AoANet")] == "-"  # one compile only in the tiny version


def test_a_check_given_different_inputs_fails_and_so_does_the_exit_status():
    gc = _script()
    same = gc.within("same", gc.max_abs_diff([torch.ones(3)], [torch.ones(3)]), 0.0, "max abs difference")
    different = gc.within("different", gc.max_abs_diff([torch.ones(3)], [torch.ones(3) + 1e-3]), 1e-4, "max abs")
    shapes = gc.within("shapes", gc.max_abs_diff([torch.ones(3)], [torch.ones(4)]), 1.0, "max abs")
    nan = gc.within("nan", float("nan"), 1.0, "relative difference")
    assert same.status == "PASS"
    assert different.status == shapes.status == nan.status == "FAIL"
    assert different.line().startswith("FAIL different: max abs 0.001 (tolerance 0.0001)")
    skip = gc.Check("fp16", "SKIP", "fp16 needs CUDA")
    assert gc.exit_status([same, skip]) == 0
    assert gc.exit_status([same, skip, different]) == 1
