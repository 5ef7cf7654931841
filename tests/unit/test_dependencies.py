"""The three dependency lists agree, and `pip install .` alone gives a package that trains."""

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.conftest import scaled

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _pins(lines):
    """{normalized name: version} of `name==version` requirement lines."""
    pins = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.\-]+)", line)
        assert match, f"not pinned with ==: {line!r}"
        pins[re.sub(r"[-_.]+", "-", match.group(1).lower())] = match.group(2)
    return pins


def test_pyproject_requirements_and_conda_env_name_the_same_pins():
    runtime = _pins(PYPROJECT["dependencies"])
    extras = {name: _pins(deps) for name, deps in PYPROJECT["optional-dependencies"].items()}
    requirements = _pins((REPO / "requirements.txt").read_text().splitlines())
    env = yaml.safe_load((REPO / "envs/captionflow.yaml").read_text())
    conda_pip = _pins(next(d for d in env["dependencies"] if isinstance(d, dict))["pip"])

    assert {"torch", "tensorboard", "pycocoevalcap"} <= set(runtime)
    assert {"snakemake", "snakemake-executor-plugin-slurm"} <= set(extras["workflow"])
    merged = dict(runtime)
    for pins in extras.values():
        merged.update(pins)
    assert requirements == merged  # the venv `make` builds is exactly pyproject's set
    assert conda_pip == runtime  # the rules' conda env is the library's runtime set


def _imported_modules():
    """{top-level module that captionflow's own code imports: whether it is only imported
    inside functions (an optional feature's import, made when the feature is used)}."""
    lazy = {}
    for path in (REPO / "captionflow").rglob("*.py"):
        tree = ast.parse(path.read_text())
        functions = (f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef))
        inside = {id(node) for f in functions for node in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module.split(".")[0]]
            else:
                continue
            for name in names:
                lazy[name] = lazy.get(name, True) and id(node) in inside
    return {
        m: only_inside for m, only_inside in lazy.items() if m not in sys.stdlib_module_names and m != "captionflow"
    }


def test_every_third_party_import_is_a_declared_dependency_or_one_of_theirs():
    declared = set(_pins(PYPROJECT["dependencies"]))
    allowed = set(declared)
    for dist in declared:
        for req in importlib.metadata.requires(dist) or []:
            if "extra ==" not in req:
                allowed.add(re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", req).group(0).lower()))
    # an extra's package only where the feature needs it: imported inside a function, so
    # `pip install .` alone still imports every module (captionflow.deploy.onnx's onnxruntime)
    extras = {name for deps in PYPROJECT["optional-dependencies"].values() for name in _pins(deps)}
    providers = importlib.metadata.packages_distributions()
    for module, only_inside_functions in _imported_modules().items():
        dists = {re.sub(r"[-_.]+", "-", d.lower()) for d in providers.get(module, [])}
        where = " at module level" if dists & extras else ""
        ok = allowed | extras if only_inside_functions else allowed
        assert dists & ok, f"captionflow imports {module} (from {dists or 'nowhere'}){where}, not a declared dependency"


@pytest.mark.slow
@pytest.mark.timeout(450)  # 110 s in a make test run sharing its 2 cores with a demo
def test_pip_install_into_a_fresh_venv_trains_and_the_conda_post_deploy_installs_this_repo(tmp_path):
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin/python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    proc = subprocess.run([*pip, str(REPO)], capture_output=True, text=True, timeout=scaled(400))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # outside the repository, so that only the installed package can be imported
    out = subprocess.run(
        [
            str(venv / "bin/python"),
            "-c",
            "import captionflow.training.xe, captionflow.training.scst, captionflow.evaluation.captioning, captionflow; print(captionflow.__file__)",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert str(venv) in out.stdout

    # snakemake --use-conda runs the post-deploy script inside the new env from the working
    # directory, which under --directory is the user's data folder: it installs this repo
    data = tmp_path / "my_data"
    data.mkdir()
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    env.pop("CAPTIONFLOW_ROOT", None)
    deploy = subprocess.run(
        ["bash", str(REPO / "envs/captionflow.post-deploy.sh")], capture_output=True, text=True, cwd=data, env=env
    )
    assert deploy.returncode == 0, deploy.stderr[-3000:]
    where = subprocess.run(
        [str(venv / "bin/python"), "-c", "import captionflow; print(captionflow.__file__)"],
        capture_output=True,
        text=True,
        cwd=data,
    )
    assert where.stdout.strip() == str(REPO / "captionflow/__init__.py")
    wrong = subprocess.run(
        ["bash", str(REPO / "envs/captionflow.post-deploy.sh")],
        capture_output=True,
        text=True,
        cwd=data,
        env={**env, "CAPTIONFLOW_ROOT": str(data)},
    )
    assert (
        wrong.returncode == 1
        and wrong.stderr.strip() == f"error: {data} is not the captionflow repository: set CAPTIONFLOW_ROOT to it"
    )
