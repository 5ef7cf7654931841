# `make demo` and `make test` work on a fresh machine: they build .venv once (again only
# when requirements.txt or pyproject.toml change: the stamp file is keyed on their hash).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.stamp-$(shell cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: venv demo report test test-fast lint format bench gpu-check

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.stamp-*
	touch $@

venv: $(STAMP)

# The whole demo DAG, end to end, on the embedded synthetic dataset.
demo: $(STAMP)
	$(BIN)/snakemake --cores all

# The demo, then Snakemake's report of it: results/report.html, one self-contained page
# (metrics, learning curves, caption gallery, attention maps, run times).
report: demo
	$(BIN)/snakemake --report results/report.html

# The full suite, slow workflow tests included (what CI runs), in two processes (one
# file per process at a time: a file's module fixtures, e.g. the local SLURM cluster, stay
# in one process). pytest's exit status, 5 ("no tests ran") included, is make's.
test: $(STAMP)
	$(BIN)/pytest -m "slow or not slow" -n 2 --dist loadfile --durations 25

# Unit tests and quick workflow tests only.
test-fast: $(STAMP)
	$(BIN)/pytest

# Snakemake's linter, then the formatters' checks: snakefmt (rules), ruff (Python).
lint: $(STAMP)
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check Snakefile rules/
	$(BIN)/ruff check
	$(BIN)/ruff format --check

format: $(STAMP)
	$(BIN)/snakefmt Snakefile rules/
	$(BIN)/ruff check --fix
	$(BIN)/ruff format

bench: $(STAMP)
	$(BIN)/python bench/bench_data.py
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_cider.py
	$(BIN)/python bench/bench_e2e.py
	$(BIN)/python bench/bench_ddp.py
	$(BIN)/python bench/bench_onnx.py
	$(BIN)/python bench/bench_checkpoint.py
	$(BIN)/python bench/bench_labels.py

# CUDA paths checked for correctness, then the throughput table (bench/gpu_check.py; at most
# ~8 minutes on an H100). Without CUDA it runs its tiny version, a test of itself.
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py
