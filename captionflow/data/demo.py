"""The embedded demo dataset: seeded synthetic scenes with image-dependent captions.

Each image holds 1 to 3 coloured shapes on a textured background; its five captions name
the shapes' colours, kinds, sizes, count, positions and pairwise relations ("to the left
of", "above"), drawn from several templates with synonyms and varied word order. A
captioner that ignores the image can only guess these, so the demo separates models that
look from models that do not. The output follows Karpathy's `dataset_coco.json` schema,
so every later stage treats it exactly like COCO.
"""

import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from captionflow.utils.io import atomic_path, write_json

SPLITS = ("train", "restval", "val", "test")

COLORS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 89, 220),
    "yellow": (240, 206, 32),
    "purple": (128, 60, 170),
    "orange": (245, 128, 14),
    "white": (246, 246, 246),
    "black": (16, 16, 16),
}
# Background name -> base RGB. White/black shapes are never put on light/dark backgrounds.
BACKGROUNDS = {
    "gray": (128, 128, 128),
    "dark": (52, 52, 60),
    "light": (214, 214, 206),
    "beige": (222, 204, 170),
    "teal": (70, 130, 128),
}
CLASHES = {("white", "light"), ("white", "beige"), ("black", "dark"), ("green", "teal")}
# Shape kind -> words a caption may use for it (synonyms).
SHAPE_WORDS = {
    "circle": ("circle", "disc", "ball"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "diamond": ("diamond", "rhombus"),
}
SIZES = {"small": (0.09, 0.12), "large": (0.17, 0.21)}  # radius as a fraction of the side
# 3x3 grid cells (col, row) -> phrase used in captions.
CELL_PHRASES = {
    (0, 0): "in the top left corner",
    (1, 0): "at the top",
    (2, 0): "in the top right corner",
    (0, 1): "on the left",
    (1, 1): "in the center",
    (2, 1): "on the right",
    (0, 2): "in the bottom left corner",
    (1, 2): "at the bottom",
    (2, 2): "in the bottom right corner",
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
OPENERS = ("", "a picture of", "an image of", "a photo showing", "there is")


def _plural(word):
    return word + ("es" if word.endswith(("x", "s")) else "s")


def make_scene(rng):
    """Draw a random scene description: background plus 1-3 objects in distinct cells."""
    background = rng.choice(sorted(BACKGROUNDS))
    texture = rng.choice(("flat", "noise", "gradient"))
    n = rng.choice((1, 1, 2, 2, 3))
    cells = rng.sample(sorted(CELL_PHRASES), n)
    objects = []
    for col, row in cells:
        color = rng.choice([c for c in sorted(COLORS) if (c, background) not in CLASHES])
        size = rng.choice(sorted(SIZES))
        lo, hi = SIZES[size]
        objects.append(
            {
                "shape": rng.choice(sorted(SHAPE_WORDS)),
                "color": color,
                "size": size,
                "radius": rng.uniform(lo, hi),
                # centre inside its cell, jittered, in [0, 1] image coordinates
                "cx": (col + 0.5 + rng.uniform(-0.12, 0.12)) / 3,
                "cy": (row + 0.5 + rng.uniform(-0.12, 0.12)) / 3,
                "cell": [col, row],
            }
        )
    return {"background": background, "texture": texture, "objects": objects}


def _shape_polygon(shape, cx, cy, r):
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    raise ValueError(shape)


def render_scene(scene, side, np_rng):
    """Render `scene` to an RGB image of `side` x `side` pixels."""
    base = np.array(BACKGROUNDS[scene["background"]], dtype=np.float32)
    canvas = np.broadcast_to(base, (side, side, 3)).copy()
    if scene["texture"] == "noise":
        canvas += np_rng.normal(0.0, 12.0, size=(side, side, 1))
    elif scene["texture"] == "gradient":
        ramp = np.linspace(-25.0, 25.0, side, dtype=np.float32)
        canvas += ramp[:, None, None] if np_rng.random() < 0.5 else ramp[None, :, None]
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    # Draw at 2x and downsample: anti-aliased edges, like a photograph's.
    big = image.resize((2 * side, 2 * side), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(big)
    for obj in scene["objects"]:
        cx, cy, r = (2 * side * obj[k] for k in ("cx", "cy", "radius"))
        fill = COLORS[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj["shape"] == "square":
            h = 0.8 * r
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        else:
            draw.polygon(_shape_polygon(obj["shape"], cx, cy, r), fill=fill)
    return big.resize((side, side), Image.Resampling.LANCZOS)


def _relation(a, b):
    """Spatial relation of object a to object b: 'to the left of', 'above', ..."""
    dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def describe(scene, rng, n_captions=5):
    """Write `n_captions` distinct captions for `scene` from randomly chosen templates."""
    objs = scene["objects"]
    bg = scene["background"]

    def noun(o):
        return rng.choice(SHAPE_WORDS[o["shape"]])

    def np_(o, with_size=False):  # noun phrase "a (large) red circle"
        size = f"{o['size']} " if with_size else ""
        return f"a {size}{o['color']} {noun(o)}"

    def opener(text):
        head = rng.choice(OPENERS)
        return f"{head} {text}" if head else text

    templates = []
    if len(objs) == 1:
        (o,) = objs
        where = CELL_PHRASES[tuple(o["cell"])]
        templates += [
            lambda: opener(f"{np_(o, True)} {where}"),
            lambda: f"{np_(o)} {where} of the image",
            lambda: opener(f"{np_(o, rng.random() < 0.5)} on a {bg} background"),
            lambda: f"a single {o['size']} {noun(o)} colored {o['color']}",
            lambda: f"one {o['color']} {noun(o)} {where} on a {bg} background",
            lambda: f"{where} there is {np_(o)}",
            lambda: f"the image shows {np_(o, True)}",
        ]
    else:
        count = COUNT_WORDS[len(objs)]
        a, b = objs[0], objs[1]
        pairs = [(x, y) for x in objs for y in objs if x is not y]
        same = len({(o["color"], o["shape"]) for o in objs}) == 1

        def listing():
            names = [np_(o) for o in rng.sample(objs, len(objs))]
            return ", ".join(names[:-1]) + " and " + names[-1]

        def relation():
            x, y = rng.choice(pairs)
            return f"{np_(x)} {_relation(x, y)} {np_(y)}"

        templates += [
            lambda: opener(relation()),
            lambda: f"{relation()} on a {bg} background",
            lambda: opener(f"{count} shapes , {listing()}"),
            lambda: f"{listing()} on a {bg} background",
            lambda: f"{count} objects : {listing()}",
            lambda: f"a {bg} background with {count} shapes",
            lambda: opener(", ".join(f"{np_(o, True)} {CELL_PHRASES[tuple(o['cell'])]}" for o in (a, b))),
        ]
        if same:
            templates.append(lambda: f"{count} {a['color']} {_plural(noun(a))}")
        colors = sorted({o["color"] for o in objs})
        if len(colors) == len(objs):
            templates.append(lambda: f"{count} shapes colored {' and '.join(rng.sample(colors, len(colors)))}")

    captions, seen, tries = [], set(), 0
    while len(captions) < n_captions:
        text = " ".join(rng.choice(templates)().split())
        tries += 1
        if text not in seen or tries > 50:
            seen.add(text)
            captions.append(text)
    return captions


def _raw(tokens):
    text = " ".join(tokens).replace(" ,", ",").replace(" :", ":")
    return text[0].upper() + text[1:] + "."


def make_demo_dataset(out_json, image_dir, split_sizes, seed, min_side=112, max_side=176, quality=92):
    """Generate the demo images and their Karpathy-schema caption file.

    out_json: path of the `dataset_coco.json`-style caption file to write.
    image_dir: folder for the JPEGs; the JSON's `filepath` is this folder's name, so the
        images root for later stages is `image_dir`'s parent.
    split_sizes: images per split, e.g. {"train": 700, "restval": 100, "val": 100, "test": 100}.
    seed: everything (scenes, captions, noise) follows from it; same seed, same bytes.
    """
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    unknown = set(split_sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown demo split(s) {sorted(unknown)}; expected {SPLITS}")
    splits = [s for s in SPLITS for _ in range(split_sizes.get(s, 0))]
    images, sentid = [], 0
    for idx, split in enumerate(tqdm(splits, desc="make_demo_dataset", unit="img")):
        # One generator per image: any image can be regenerated alone, in any order.
        rng = random.Random(seed * 1_000_003 + idx)
        np_rng = np.random.default_rng([seed, idx])
        scene = make_scene(rng)
        side = rng.randrange(min_side, max_side + 1, 8)
        filename = f"demo_{idx:06d}.jpg"
        with atomic_path(image_dir / filename) as tmp:
            render_scene(scene, side, np_rng).save(tmp, format="JPEG", quality=quality)
        sentences = []
        for text in describe(scene, rng):
            tokens = text.split()
            sentences.append({"tokens": tokens, "raw": _raw(tokens), "imgid": idx, "sentid": sentid})
            sentid += 1
        images.append(
            {
                "filepath": image_dir.name,
                "filename": filename,
                "imgid": idx,
                "cocoid": idx + 1,
                "split": split,
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
                "demo_scene": scene,  # ground truth, for tests; other readers ignore it
            }
        )
    write_json(out_json, {"dataset": "captionflow-demo", "images": images})
    return len(images)
