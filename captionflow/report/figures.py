"""Headless figure output shared by the report's plots: Agg backend, atomic PNG writes."""

import matplotlib

matplotlib.use("Agg")  # no display anywhere: a cluster node renders the same PNGs

from matplotlib import pyplot as plt  # noqa: E402  (after the backend is chosen)

from captionflow.utils.io import atomic_path  # noqa: E402

DPI = 100


def save_png(fig, path):
    """Write `fig` to `path` as PNG, atomically, and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
