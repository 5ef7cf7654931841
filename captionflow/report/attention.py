"""Attention maps: where an attention captioner looks while it writes each word.

Show-Attend-Tell's alpha over the grid (Xu et al. 2015, eq. 5) and the Transformer's (and
ExpansionNet v2's) last-layer cross-attention averaged over heads (AoANet's multi-head
attention likewise), recorded during greedy decoding by a forward hook on the layer the
model names (`CaptionModel.attention_layer`). The hook only reads: the words decoded with
it are the words decoded without it.
"""

import contextlib
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from captionflow.data.captions import SplitData, read_labels_json
from captionflow.decoding.search import greedy, to_words
from captionflow.errors import CaptionflowError
from captionflow.layers import AdditiveAttention, MultiHeadAttention
from captionflow.models import checkpoint
from captionflow.report.figures import plt, save_png
from captionflow.report.gallery import first_images, image_files
from captionflow.utils.threads import use_threads

COLUMNS = 6  # word panels per row of a figure


@contextlib.contextmanager
def recorded_attention(model):
    """Collect the model's attention over regions at every decoding step.

    Yields a list that gets one (B, R) tensor per `step` call: the weights of the layer
    `model.attention_layer()` names (heads averaged)."""
    layer = model.attention_layer()
    if layer is None:
        raise CaptionflowError(
            f"model {model.registry_name or type(model).__name__} has no attention over image regions to show"
        )
    steps = []

    def hook(module, args, kwargs, output):
        if isinstance(module, AdditiveAttention):
            weights = output[1]  # (B, R)
        elif isinstance(module, MultiHeadAttention):
            mask = kwargs.get("mask", args[4] if len(args) > 4 else None)
            weights = module.weights(args[0], args[1], mask).mean(dim=1)[:, -1]  # (B, h, T, R) -> (B, R)
        else:
            raise TypeError(f"no attention weights to read from {type(module).__name__}")
        steps.append(weights.detach().float().cpu())

    handle = layer.register_forward_hook(hook, with_kwargs=True)
    try:
        yield steps
    finally:
        handle.remove()


def greedy_attention(model, feats, max_len=16):
    """Greedy captions and the attention behind each word.

    feats {"att": (B, R, D), ...} -> tokens (B, T) zero-padded after the end token,
    weights (B, T, R): row t is the attention while word t was chosen."""
    model.eval()
    with recorded_attention(model) as steps, torch.no_grad():
        tokens, _ = greedy(model, feats, max_len)
    return tokens, torch.stack(steps[: tokens.shape[1]], dim=1)


def grid_side(regions):
    """The side of the square feature grid of `regions` cells; refuses region features."""
    side = math.isqrt(regions)
    if side * side != regions:
        raise CaptionflowError(
            f"attention maps need grid features (a square of cells); these have {regions} regions "
            "(region features): report.attention_images 0 turns the maps off"
        )
    return side


def plot_attention(image, words, weights, title, out_png):
    """One figure: the image, then per word the image under its attention.

    image: PIL image (the resized copy the features were extracted from); words: the
    caption's words; weights (len(words), R) over a square grid, row-major as extracted."""
    side = grid_side(weights.shape[1])
    panels = len(words) + 1
    cols = min(COLUMNS, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.2 * rows), squeeze=False)
    pixels = np.asarray(image.convert("RGB"))
    h, w = pixels.shape[:2]
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(pixels)
    axes.flat[0].set_title("image", fontsize=9)
    for ax, word, alpha in zip(axes.flat[1:], words, weights):
        ax.imshow(pixels)
        grid = alpha.reshape(side, side).numpy()
        ax.imshow(
            grid,
            cmap="jet",
            alpha=0.5,
            extent=(0, w, h, 0),
            interpolation="bilinear",
            vmin=0,
            vmax=max(float(grid.max()), 1e-6),
        )
        ax.set_title(word, fontsize=10)
    fig.suptitle(title, fontsize=10)
    save_png(fig, out_png)


def attention_maps(
    checkpoint_path, features, labels_h5, labels_json, manifest, out_dir, images=3, max_len=16, split="test", threads=1
):
    """Write `<out_dir>/<image_id>.png` for the first `images` images of `split` (the
    gallery's first ones): the checkpoint's greedy caption, word by word, over the image."""
    use_threads(threads)
    model, ckpt = checkpoint.load_model(checkpoint_path, read_labels_json(labels_json)["vocab_hash"])
    data = SplitData(labels_h5, labels_json, features, split, blind=ckpt.get("blind", False))
    ids = first_images(labels_json, split, images)
    rows = [data.image_ids.index(i) for i in ids]
    tokens, weights = greedy_attention(model, data.features.get(rows), max_len)
    files = image_files(manifest)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for image_id, alpha, caption in zip(ids, weights, to_words(tokens, data.ix_to_word)):
        words = caption.split()
        with Image.open(files[image_id]) as image:
            title = f"{ckpt['model_name']} ({ckpt.get('stage', '?')}), test image {image_id}: {caption}"
            plot_attention(image, words, alpha[: len(words)], title, out_dir / f"{image_id}.png")
    print(f"attention maps of {len(ids)} test images in {out_dir}", flush=True)
