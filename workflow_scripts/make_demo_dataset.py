"""Rule make_demo_dataset: render the synthetic demo scenes and their captions."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
sys.stdout = sys.stderr

from captionflow.data.demo import make_demo_dataset

make_demo_dataset(
    out_json=snakemake.output.captions,
    image_dir=snakemake.output.images,
    split_sizes=snakemake.params.splits,
    seed=snakemake.params.seed,
    min_side=snakemake.params.min_side,
    max_side=snakemake.params.max_side,
)
