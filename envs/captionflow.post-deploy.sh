#!/usr/bin/env bash
# Run by `snakemake --use-conda` once, inside the freshly created env: install the
# captionflow library into it from this repository, the folder above this script (never
# the working directory, which under --directory is the user's data folder).
# CAPTIONFLOW_ROOT overrides it, for a workflow whose envs/ are not inside the repository.
set -euo pipefail
root="${CAPTIONFLOW_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
if [ ! -f "$root/pyproject.toml" ] || ! grep -q '^name = "captionflow"' "$root/pyproject.toml"; then
    echo "error: $root is not the captionflow repository: set CAPTIONFLOW_ROOT to it" >&2
    exit 1
fi
pip install --no-deps -e "$root"
