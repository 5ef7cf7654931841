#!/usr/bin/env bash
# Run by `snakemake --use-conda` once, inside the freshly created env: install the
# captionflow library (this repository) into it. Snakemake runs this from its working
# directory, normally the repository root; set CAPTIONFLOW_ROOT when you run elsewhere.
set -euo pipefail
pip install --no-deps -e "${CAPTIONFLOW_ROOT:-.}"
