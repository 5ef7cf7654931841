"""`snakemake --report` on a tiny DAG of three experiments (SCST, an image-blind twin, ES):
the metrics table, learning curves, gallery and attention maps are in it, and the HTML
report renders in headless Chromium."""

import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from tests.conftest import scaled
from tests.unit.test_report import assert_png_shows_something
from tests.workflow.conftest import TINY, Workflow, jobs, merge

# the report DAG (module fixture) took 159 s in a make test run sharing its 2 cores with a demo
pytestmark = pytest.mark.timeout(600)

SMALL = {"threads": 1, "xe": {"epochs": 2, "batch_size": 8}, "evaluate": {"beam_size": 2}}
SAT = {"model": "show_attend_tell", "model_args": {"embed_size": 16, "hidden_size": 32, "att_size": 16}, **SMALL}
GALLERY, ATTENTION = 4, 2
CONFIG = merge(
    TINY,
    {
        "experiments": {
            "sat": {**SAT, "stages": ["xe", "scst"], "scst": {"epochs": 2, "batch_size": 8, "samples": 2}},
            "sat_blind": {**SAT, "blind": True},
            "fc": {
                "model": "fc",
                "model_args": {"embed_size": 16, "hidden_size": 32},
                **SMALL,
                "stages": ["es"],
                "es": {"iterations": 3, "offspring": 4},
            },
        },
        "report": {"gallery_images": GALLERY, "attention_images": ATTENTION},
    },
)
STAGES = {name: e.get("stages", ["xe"]) for name, e in CONFIG["experiments"].items()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny DAG, run once: `all` makes the figures and pages."""
    workflow = Workflow(tmp_path_factory.mktemp("report") / "wf", CONFIG)
    counts = jobs(workflow.run())
    assert counts["plot_experiment_job"] == 3 and counts["report_tables"] == 1
    assert counts["plot_attention_job"] == 1  # sat's; fc has no attention, sat_blind no image to attend to
    return workflow


def _zip_files(path):
    with zipfile.ZipFile(path) as z:
        return {name: z.read(name) for name in z.namelist() if not name.endswith("/")}


@pytest.mark.slow
def test_report_holds_metrics_curves_gallery_and_attention_maps(built):
    built.run("--report", "report.zip")
    files = _zip_files(built / "report.zip")
    by_content = {data: name for name, data in files.items()}

    # the metrics table: every experiment x stage, the SCST reward and the blind gap
    metrics = next(data.decode() for name, data in files.items() if name.endswith("/metrics.html"))
    rows = re.findall(r"<tr[^>]*><td class='text'>([^<]+)</td><td class='text'>([^<]+)</td>", metrics)
    assert rows == [(e, s) for e in sorted(STAGES) for s in STAGES[e]]  # the config's order (Workflow writes it sorted)
    assert "reward=CIDEr-D" in metrics and "(sat_blind)" in metrics
    benchmarks = next(data.decode() for name, data in files.items() if name.endswith("/benchmarks.html"))
    assert all(
        f">{rule}<" in benchmarks
        for rule in ("train_xe", "train_scst", "train_es", "evaluate", "plot_experiment", "plot_attention")
    )

    # at least one learning-curve PNG per experiment, and SCST's and ES's own curves
    for experiment, stages in STAGES.items():
        curves = sorted(p.name for p in (built / f"results/{experiment}/report/curves").glob("*.png"))
        assert curves == sorted({"xe": "training.png", "scst": "scst.png", "es": "es.png"}[s] for s in stages)
        for name in curves:
            assert (built / f"results/{experiment}/report/curves/{name}").read_bytes() in by_content, (
                f"{experiment} {name} not in the report"
            )

    # the gallery: N images, each with every stage's caption and two references
    for experiment, stages in STAGES.items():
        page = (built / f"results/{experiment}/report/gallery.html").read_bytes()
        assert page in by_content
        text = page.decode()
        predictions = {
            s: json.loads((built / f"results/{experiment}/test/{s}/predictions.json").read_text()) for s in stages
        }
        shown = [int(i) for i in re.findall(r"data-image-id='(\d+)'", text)]
        assert shown == [p["image_id"] for p in predictions[stages[0]][:GALLERY]]
        assert text.count("src='data:image/jpeg;base64,") == GALLERY
        assert text.count("<dt>reference</dt>") == 2 * GALLERY
        for stage in stages:
            assert text.count(f"<dt>{stage}</dt>") == GALLERY
        for uri in re.findall(r"src='data:image/jpeg;base64,([^']+)'", text):
            with Image.open(io.BytesIO(base64.b64decode(uri))) as thumb:
                assert thumb.size == (64, 64)

    # attention maps of the first gallery images, for the attention models only
    assert (
        not (built / "results/fc/report/attention").exists()
        and not (built / "results/sat_blind/report/attention").exists()
    )
    maps = sorted((built / "results/sat/report/attention").glob("*.png"))
    assert [p.stem for p in maps] == sorted(str(i) for i in shown[:ATTENTION])
    assert all(p.read_bytes() in by_content for p in maps)

    # every PNG of the report decodes and shows something
    pngs = [name for name in files if name.endswith(".png")]
    assert len(pngs) == 4 + ATTENTION  # sat: training, scst; sat_blind: training; fc: es; sat's maps
    for name in pngs:
        with Image.open(io.BytesIO(files[name])) as image:
            pixels = np.asarray(image.convert("L"), dtype=np.float32)
        assert pixels.size > 100 * 100 and pixels.std() > 10, f"{name} is blank"


def _chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's package")
        pytest.skip("chromium not installed (apt-get install chromium)")
    return found


@pytest.mark.slow
def test_html_report_renders_in_headless_chromium(built, tmp_path):
    chromium = _chromium()
    built.run("--report", "report.html")
    url = (built / "report.html").as_uri()
    browser = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
    ]
    dom = subprocess.run([*browser, "--dump-dom", url], capture_output=True, text=True, timeout=scaled(120)).stdout
    # the page's script ran: the menu it builds (not in the file) lists the report's categories
    assert "<span>Workflow</span>" not in (built / "report.html").read_text()
    for category in ("Metrics", "Learning curves", "Caption gallery", "Attention maps", "Run time and memory"):
        assert f"<span>{category}</span>" in dom, f"{category!r} not rendered"
    assert (
        "<span>Workflow</span>" in dom and "captionflow trains and evaluates image captioners" in dom
    )  # the description
    shot = tmp_path / "report.png"
    subprocess.run(
        [*browser, f"--screenshot={shot}", "--window-size=1280,800", url], capture_output=True, timeout=scaled(120)
    )
    assert_png_shows_something(shot)
    with Image.open(shot) as image:
        assert image.size == (1280, 800)


def test_more_attention_maps_than_gallery_images_is_one_line(tmp_path):
    workflow = Workflow(tmp_path / "wf", merge(CONFIG, {"report": {"gallery_images": 2, "attention_images": 3}}))
    proc = workflow.run("-n", check=False)
    assert proc.returncode != 0
    assert (
        "invalid config at report.attention_images: 3 is more than report.gallery_images (2)"
        in proc.stdout + proc.stderr
    )


def test_report_is_refused_while_a_run_is_in_progress(workflow):
    """A report made while Snakemake runs in the directory would pack that run's
    half-written results: it is refused in one line, told by Snakemake's own lock files;
    once that run is gone (killed, then --unlock), the same report is made."""
    locks = workflow / ".snakemake/locks"
    run = subprocess.Popen(
        workflow.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.time() + 120
        while not any(locks.glob("*.lock")) and run.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        assert any(locks.glob("*.lock")), "the run ended before it locked the directory"
        os.killpg(run.pid, signal.SIGSTOP)  # the run holds still, in progress, until killed
        during = workflow.run("--report", "report.html", check=False)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    out = during.stdout + during.stderr
    assert during.returncode != 0 and not (workflow / "report.html").exists()
    line = next(line for line in out.splitlines() if "a Snakemake run is in progress" in line)
    assert f"in {workflow.path} (its lock files are in .snakemake/locks)" in line
    assert "make the report when the run has ended" in line and "snakemake --unlock" in line
    assert "Traceback" not in out

    workflow.run("--unlock")  # what a user does after a killed run
    workflow.run("--report", "report.html")
    assert (workflow / "report.html").exists()
