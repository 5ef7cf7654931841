"""Stage export_onnx (rule export_onnx_job, one job per experiment; not in `all`): a bundle's image encoder and decoder step as ONNX graphs."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
sys.stdout = sys.stderr

from captionflow.deploy.onnx import export_bundle
from captionflow.errors import one_line_errors

with one_line_errors():
    export_bundle(snakemake.input.bundle, snakemake.output[0])
