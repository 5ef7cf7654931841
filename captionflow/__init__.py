"""captionflow: image captioning stages (data, features, training, evaluation) as a library.

The Snakemake workflow in the repository root calls into this package; the package itself
never imports snakemake, so every stage can also be run and tested from plain Python.

Caption your own images with an exported experiment (results/<experiment>/export/):

    import captionflow
    captioner = captionflow.load("results/show_attend_tell/export")
    captioner.caption(["photo.jpg", "other.png"])   # or PIL images -> list of captions
"""

__version__ = "0.1.0"


def load(bundle, device="auto"):
    """An exported bundle, ready to caption (captionflow.deploy.captioner.Captioner)."""
    from captionflow.deploy.captioner import Captioner  # torch and the models load on first use

    return Captioner(bundle, device)
