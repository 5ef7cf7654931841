"""Rule resize_images: every listed image -> an RGB JPEG of the configured size."""

import sys

sys.stderr = open(snakemake.log[0], "w", buffering=1)
sys.stdout = sys.stderr

from captionflow.data.resize import resize_images
from captionflow.errors import one_line_errors

with one_line_errors():
    resize_images(
        captions=snakemake.input.captions,
        images_root=snakemake.params.images_root,
        image_base_dir=snakemake.params.image_base_dir,
        manifest=snakemake.output.manifest,
        skipped=snakemake.output.skipped,
        size=snakemake.params.size,
        mode=snakemake.params.mode,
        quality=snakemake.params.quality,
        on_bad_image=snakemake.params.on_bad_image,
        threads=snakemake.threads,
        max_pixels=snakemake.params.max_pixels,
        allow_outside_root=snakemake.params.allow_outside_root,
    )
