"""Shared test setup: no network, small generated data."""

import os

import pytest

# A stray hub call fails at once instead of retrying for 45 s.
os.environ["HF_HUB_OFFLINE"] = "1"

# The longest files, longest first: `make test` hands whole files to its two processes
# in collection order, so these start at once and the short ones fill in around them.
LONGEST_FIRST = ("workflow/test_train_eval.py", "unit/test_model_zoo.py", "slurm/test_slurm.py")


# Time limits. Every test has one (pytest-timeout): the `timeout` of pyproject.toml, sized
# for a unit test, or its own `@pytest.mark.timeout(seconds)`, sized to its work: about 3x
# what it takes on an idle 2-core machine under `make test`. On a busier machine the limits
# grow by TIMEOUT_SCALE: CAPTIONFLOW_TIMEOUT_SCALE if set, else the load average per CPU
# when the run starts (before its own processes), at least 1. The subprocess limits of the
# workflow tests go through `scaled` too, so a loaded machine slows tests down without
# failing them.
TIMEOUT_SCALE_VARIABLE = "CAPTIONFLOW_TIMEOUT_SCALE"


def timeout_scale():
    value = os.environ.get(TIMEOUT_SCALE_VARIABLE)
    if value is None:
        return max(1.0, os.getloadavg()[0] / len(os.sched_getaffinity(0)))
    try:
        scale = float(value)
    except ValueError:
        scale = float("nan")
    if not scale >= 1:
        raise pytest.UsageError(
            f"{TIMEOUT_SCALE_VARIABLE}={value!r}: give a number >= 1 (the factor on every test's time limit)"
        )
    return scale


def scaled(seconds):
    """A time limit of `seconds` on an idle machine, on this one."""
    return seconds * float(os.environ.get(TIMEOUT_SCALE_VARIABLE, "1"))


def pytest_report_header(config):
    return f"time limits x{os.environ[TIMEOUT_SCALE_VARIABLE]} ({TIMEOUT_SCALE_VARIABLE})"


def pytest_configure(config):
    """The time-limit factor, measured once by the controller and inherited by the
    pytest-xdist workers through the environment.

    Under pytest-xdist (`make test`, -n 2) each worker gets its own share of the CPUs,
    inherited by everything it starts (Snakemake, its jobs, torchrun, Java). The stages
    use no more threads than their CPUs (`captionflow.utils.threads`), so two workers do
    not run four spinning OpenMP threads on two cores, which made every test 2-4x slower."""
    os.environ[TIMEOUT_SCALE_VARIABLE] = f"{timeout_scale():.2f}"
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ...
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cpus = sorted(os.sched_getaffinity(0))
    if worker and workers <= len(cpus):
        os.sched_setaffinity(0, cpus[int(worker[2:]) :: workers])


def pytest_collection_modifyitems(items):
    def rank(item):
        path = item.path.as_posix()
        return next((i for i, name in enumerate(LONGEST_FIRST) if path.endswith(name)), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: the rest keep their order
    scale = float(os.environ[TIMEOUT_SCALE_VARIABLE])
    if scale != 1:
        default = items[0].config.getini("timeout") if items else 0
        for item in items:
            marker = item.get_closest_marker("timeout")
            limit = float(marker.args[0]) if marker else float(default or 0)
            if limit:  # prepended: pytest-timeout reads the closest marker
                item.add_marker(pytest.mark.timeout(limit * scale), append=False)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A tiny demo dataset run through the data stages: what training stages read."""
    return build_demo_data(tmp_path_factory.mktemp("data"), {"train": 20, "val": 7, "test": 5}, seed=1)


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory):
    """A small demo dataset (300 training images) through the data stages: enough for a
    model to learn to look at the image in a few epochs."""
    splits = {"train": 300, "val": 50, "test": 50}
    return build_demo_data(
        tmp_path_factory.mktemp("small_demo"), splits, seed=0, word_count_threshold=2, threads=2, feature_batch=25
    )


def build_demo_data(root, splits, seed, word_count_threshold=0, threads=1, feature_batch=8, sides=(64, 96), size=64):
    """Demo images (sides: smallest and largest) and captions under `root`, resized to `size`
    px, labels and random-init resnet18 features."""
    from captionflow.config import build
    from captionflow.data.demo import make_demo_dataset
    from captionflow.data.labels import prepro_labels
    from captionflow.data.resize import resize_images
    from captionflow.features.backbones import Backbone
    from captionflow.features.extract import FeatureConfig, extract_features

    demo = root / "demo/dataset_coco.json"
    make_demo_dataset(demo, root / "demo/images", splits, seed=seed, min_side=sides[0], max_side=sides[1])
    resize_images(
        demo,
        root / "demo",
        root / "resized",
        root / "manifest.json",
        root / "skipped.tsv",
        size,
        "crop",
        95,
        "fail",
        threads,
    )
    prepro_labels(
        demo,
        root / "skipped.tsv",
        root / "labels.h5",
        root / "labels.json",
        root / "references.json",
        16,
        word_count_threshold,
        True,
    )
    cfg = build(FeatureConfig, batch_size=feature_batch, num_workers=0)
    backbone = Backbone("resnet18", "none", 0, size, 0)
    extract_features(
        root / "labels.json",
        root / "manifest.json",
        {s: root / f"{s}.h5" for s in ("train", "val", "test")},
        backbone,
        cfg,
    )
    return root


_FIGURES = []


@pytest.fixture
def report_figure():
    """Record a measured figure; all of them are printed at the end of the test run."""
    return _FIGURES.append


def pytest_sessionfinish(session):
    """Under pytest-xdist (`make test`), a worker hands its figures to the controller."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["captionflow_figures"] = list(_FIGURES)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    _FIGURES.extend(getattr(node, "workeroutput", {}).get("captionflow_figures", []))


def pytest_terminal_summary(terminalreporter):
    if _FIGURES:
        terminalreporter.section("captionflow figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)
