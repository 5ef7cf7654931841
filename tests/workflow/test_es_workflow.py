"""train_es through real Snakemake on the demo: NIC-NES and NIC-ES from an XE-trained `fc`
raise greedy val CIDEr-D above their start, and the evaluate stage reports the ES stage."""

import json

import pytest
import yaml

from tests.workflow.conftest import REPO, Workflow, jobs

FC = yaml.safe_load((REPO / "config.yaml").read_text())["experiments"]["fc"]


@pytest.mark.slow
@pytest.mark.timeout(600)  # 174 s in a make test run sharing its 2 cores with a demo
def test_nes_and_ga_from_xe_raise_val_cider_on_the_demo(tmp_path, report_figure):
    es = {"iterations": 20, "offspring": 16, "noise_stdev": 0.01, "stepsize": 0.003, "val_every": 5}
    experiments = {
        "fc_nes": {**FC, "threads": 1, "stages": ["xe", "es"], "es": {**es, "algorithm": "nes"}},
        "fc_ga": {**FC, "threads": 1, "stages": ["xe", "es"], "es": {**es, "algorithm": "ga", "population": 4}},
    }
    workflow = Workflow(tmp_path / "demo", {"experiments": experiments})  # demo-sized data
    counts = jobs(workflow.run(timeout=600))
    assert counts["train_es_job"] == 2 and counts["evaluate_job"] == 4
    for name in experiments:
        start = json.loads((workflow / f"results/{name}/test/xe/metrics.json").read_text())
        history = (workflow / f"results/{name}/es/history.tsv").read_text().splitlines()
        header = history[0].split("\t")
        assert {
            "best_fitness",
            "mean_fitness",
            "noise_stdev",
            "batch_size",
            "offspring_per_s",
            "bytes_exchanged",
        } <= set(header)
        rows = [dict(zip(header, line.split("\t"))) for line in history[1:]]
        xe_val = max(
            float(line.split("\t")[3])
            for line in (workflow / f"results/{name}/xe/history.tsv").read_text().splitlines()[1:]
        )
        es_val = max(float(r["val_cider_d"]) for r in rows if r["val_cider_d"])
        report = json.loads((workflow / f"results/{name}/test/metrics.json").read_text())["stages"]
        test_xe, test_es = report["xe"]["metrics"]["CIDEr"], report["es"]["metrics"]["CIDEr"]
        report_figure(
            f"demo {name} (20 generations of 16): greedy val CIDEr-D XE {xe_val:.3f} -> ES {es_val:.3f}; test (beam 3) {test_xe:.3f} -> {test_es:.3f}"
        )
        assert es_val > xe_val + 0.02
        assert start["stage"] == "xe" and report["es"]["stage"] == "es"
