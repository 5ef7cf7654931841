"""Dependencies point one way (STYLE.md): a module imports only from its own layer or the
layers below it, packages of one layer do not import each other in a circle, and a training
regime never imports another regime."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "captionflow"

# errors, utils, config (the schema's defaults) <- layers <- models (data, features beside them) <- decoding
#   <- training, metrics <- stages, deploy (bundles, ONNX), report (figures, pages) <- cli
LAYER = {
    "errors": 0, "utils": 0, "config": 0,
    "layers": 1,
    "models": 2, "data": 2, "features": 2,
    "decoding": 3,
    "training": 4, "metrics": 4,
    "stages": 5, "deploy": 5, "prefetch": 5, "report": 5,
    "cli": 6,
}  # fmt: skip
REGIMES = {"captionflow.training.xe", "captionflow.training.scst", "captionflow.training.e2e", "captionflow.training.es", "captionflow.training.retrieval"}


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
    assert {_package(m) for m in _imports() if m != "captionflow"} <= set(LAYER)


def test_no_module_imports_a_higher_layer():
    wrong = [
        f"{m} (layer {LAYER[_package(m)]}) imports {t} (layer {LAYER[_package(t)]})"
        for m, targets in _imports().items() if m != "captionflow"
        for t in targets if _package(t) in LAYER and LAYER[_package(t)] > LAYER[_package(m)]
    ]  # fmt: skip
    assert wrong == []


def test_packages_do_not_import_each_other_in_a_circle():
    edges = {}
    for m, targets in _imports().items():
        for t in targets:
            if _package(t) != _package(m) and m != "captionflow":
                edges.setdefault(_package(m), set()).add(_package(t))
    both = sorted(f"{a} <-> {b}" for a in edges for b in edges[a] if a < b and a in edges.get(b, ()))
    assert both == []


def test_a_training_regime_never_imports_another():
    graph = _imports()
    crossing = [f"{m} imports {t}" for m in REGIMES & graph.keys() for t in graph[m] if any(t == r or t.startswith(r + ".") for r in REGIMES - {m})]
    assert crossing == []
