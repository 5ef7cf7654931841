"""captionflow: image captioning stages (data, features, training, evaluation) as a library.

The Snakemake workflow in the repository root calls into this package; the package itself
never imports snakemake, so every stage can also be run and tested from plain Python.
"""

__version__ = "0.1.0"
