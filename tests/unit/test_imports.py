"""Dependencies point one way (ARCHITECTURE.md, "Layers"): a module imports only from its own
layer or the layers below it, packages of one layer do not import each other in a circle,
deploy, report, evaluation and metrics never import training, and a training regime never
imports another regime."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "captionflow"

ARCHITECTURE = "ARCHITECTURE.md"

# errors, utils, config (the schema's defaults) <- layers <- models (data, features beside them) <- decoding
#   <- metrics <- evaluation, deploy (bundles, ONNX), report (figures, pages), prefetch <- training <- cli
LAYER = {
    "errors": 0,
    "utils": 0,
    "config": 0,
    "layers": 1,
    "models": 2,
    "data": 2,
    "features": 2,
    "decoding": 3,
    "metrics": 4,
    "evaluation": 5,
    "deploy": 5,
    "report": 5,
    "prefetch": 5,
    "training": 6,
    "cli": 7,
}
# What a trained model is used by, never what trains it: these never import training.
NEVER_IMPORT_TRAINING = ("deploy", "report", "evaluation", "metrics")
REGIMES = {
    "captionflow.training.xe",
    "captionflow.training.scst",
    "captionflow.training.scst_e2e",
    "captionflow.training.e2e",
    "captionflow.training.es",
    "captionflow.training.retrieval",
}


def _imports():
    """{module: set of captionflow modules it imports}, for every module of the package."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets.update([node.module] + [f"{node.module}.{a.name}" for a in node.names])
        graph[module] = {t for t in targets if t.startswith("captionflow.")}
    return graph


def _package(module):
    return module.split(".")[1] if "." in module else module


def test_every_package_has_a_layer():
    missing = sorted({_package(m) for m in _imports() if m != "captionflow"} - set(LAYER))
    assert missing == [], f"packages without a layer: {missing}; give each one its layer here and in {ARCHITECTURE}"


def test_no_module_imports_a_higher_layer():
    wrong = [
        f"{m} (layer {LAYER[_package(m)]}) imports {t} (layer {LAYER[_package(t)]})"
        for m, targets in _imports().items()
        if m != "captionflow"
        for t in targets
        if _package(t) in LAYER and LAYER[_package(t)] > LAYER[_package(m)]
    ]
    assert wrong == [], f"imports of a higher layer (the layers: {ARCHITECTURE}): {wrong}"


def test_packages_do_not_import_each_other_in_a_circle():
    edges = {}
    for m, targets in _imports().items():
        for t in targets:
            if _package(t) != _package(m) and m != "captionflow":
                edges.setdefault(_package(m), set()).add(_package(t))
    both = sorted(f"{a} <-> {b}" for a in edges for b in edges[a] if a < b and a in edges.get(b, ()))
    assert both == [], f"packages that import each other ({ARCHITECTURE}: dependencies point one way): {both}"


def test_deploy_report_evaluation_and_metrics_never_import_training():
    wrong = [
        f"{m} imports {t}"
        for m, targets in _imports().items()
        if _package(m) in NEVER_IMPORT_TRAINING
        for t in targets
        if _package(t) == "training"
    ]
    assert wrong == [], (
        f"{ARCHITECTURE}: what uses a trained model never imports training (move what they share below it): {wrong}"
    )


def test_a_training_regime_never_imports_another():
    graph = _imports()
    crossing = [
        f"{m} imports {t}"
        for m in REGIMES & graph.keys()
        for t in graph[m]
        if any(t == r or t.startswith(r + ".") for r in REGIMES - {m})
    ]
    assert crossing == [], (
        f"{ARCHITECTURE}: a training regime never imports another; move what two regimes share to a module that is not a regime: {crossing}"
    )
