"""Import CUHK-PEDES (Li et al. 2017, "Person Search with Natural Language Description")
into the Karpathy caption schema, keeping each image's person identity.

CUHK-PEDES ships one `reid_raw.json`: a list of records, one per image, with `split`
(train/val/test, disjoint by identity), `file_path` (relative to the dataset's `imgs/`
folder, e.g. "CUHK01/0363004.png"), `captions` (raw descriptions, usually 2),
`processed_tokens` (one lower-cased token list per caption) and `id` (the person identity,
shared by several images). The import writes the `dataset_coco.json` layout that
`captionflow.data.karpathy.load_karpathy` and every later data stage read, plus a
`person_id` per image, which identity-aware retrieval (`captionflow.metrics.retrieval`)
needs: in person search every image of the queried person counts as a match.

Tokens come from `processed_tokens`; a file without that field, or a token list with no
word in it, falls back to tokenizing the raw caption. A file whose lists disagree (two
captions, one token list) is refused rather than guessed at. A `file_path` that is
absolute or has a `..` part is refused, so no record can name an image outside the
images folder.

An `id` must fit a signed 64-bit integer: identities become int64 tensors in retrieval
training and evaluation, where a larger one would fail late or wrap around. The same image
(the same `file_path` once `.` parts and doubled slashes are dropped) listed in two records
is one image: with the same `id` and split its captions are joined, in file order, under the
first record's position (more descriptions of one picture, not a second picture that would
count twice as a match in person search); with another `id` it is refused, since one image
shows one person and either id may be the typo; in another split it is refused, since splits
are disjoint by identity and the image would leak between them.
"""

import random
import re
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageDraw

from captionflow.data.karpathy import _read_json, tokenize
from captionflow.errors import CaptionflowError
from captionflow.utils.io import atomic_path, write_json

CUHK_PEDES_SPLITS = ("train", "val", "test")
REQUIRED_FIELDS = ("split", "captions", "file_path", "id")
INT64 = (-(2**63), 2**63 - 1)  # what a person id must fit: retrieval holds identities as torch.int64


def import_cuhk_pedes(reid_raw_json, out_json):
    """Convert `reid_raw_json` to a Karpathy-style caption file at `out_json` (atomic).

    Images keep the file's order (a repeated image its first place, its captions joined: see
    the module docstring); `imgid` and `cocoid` are the running image index, `sentid` the
    running caption index, `person_id` the record's `id`.
    Returns counts: {"images", "sentences", "identities", "splits": {split: images}}.
    Raises CaptionflowError (one line naming the file and the record) on bad input.
    """
    path = Path(reid_raw_json)
    where = f"CUHK-PEDES file {path}"
    records = _read_json(path, where)
    if not isinstance(records, list):
        raise CaptionflowError(
            f"{where}: expected a list of image records (CUHK-PEDES reid_raw.json), found a {type(records).__name__}"
        )
    if not records:
        raise CaptionflowError(f"{where}: the list of image records is empty")
    by_path = {}  # (folder, file name) -> (record position, file_path as written, image)
    for i, record in enumerate(records):
        image = _convert(record, where=f"{where}: record {i}")
        key = (image["filepath"], image["filename"])
        if key not in by_path:
            by_path[key] = (i, record["file_path"], image)
            continue
        first, first_path, kept = by_path[key]
        same_image = f"{where}: record {i} ({record['file_path']}) and record {first} ({first_path}) are the same image"
        if image["person_id"] != kept["person_id"]:
            raise CaptionflowError(
                f"{same_image} with person ids {kept['person_id']} and {image['person_id']}; "
                "one image shows one person: correct the wrong 'id' or remove one of the records"
            )
        if image["split"] != kept["split"]:
            raise CaptionflowError(
                f"{same_image} in splits {kept['split']!r} and {image['split']!r}; "
                "splits are disjoint: keep the image in one split"
            )
        kept["sentences"] += image["sentences"]  # same person, same split: more descriptions of it
    images, sentid = [], 0
    for imgid, (_, _, image) in enumerate(by_path.values()):  # first appearance order
        for sentence in image["sentences"]:
            sentence.update(imgid=imgid, sentid=sentid)
            sentid += 1
        image.update(imgid=imgid, cocoid=imgid, sentids=[s["sentid"] for s in image["sentences"]])
        images.append(image)
    write_json(out_json, {"dataset": "cuhk_pedes", "images": images})
    splits = {s: sum(img["split"] == s for img in images) for s in CUHK_PEDES_SPLITS}
    identities = len({img["person_id"] for img in images})
    return {"images": len(images), "sentences": sentid, "identities": identities, "splits": splits}


def _convert(record, where):
    """One reid_raw.json record -> one Karpathy image dict (numbered by the caller)."""
    if not isinstance(record, dict):
        raise CaptionflowError(f"{where} is a {type(record).__name__}, expected an object")
    missing = [f for f in REQUIRED_FIELDS if f not in record]
    if missing:
        raise CaptionflowError(f"{where} has no {', '.join(repr(f) for f in missing)} field")
    filepath, filename = _split_path(record["file_path"], where)
    where = f"{where} ({record['file_path']})"
    person_id = record["id"]
    if not isinstance(person_id, int) or isinstance(person_id, bool):
        raise CaptionflowError(f"{where} has 'id' {person_id!r}; expected an integer person identity")
    if not INT64[0] <= person_id <= INT64[1]:
        raise CaptionflowError(
            f"{where} has 'id' {person_id}, beyond the 64-bit integers person ids are held in "
            f"({INT64[0]} to {INT64[1]}); renumber the identities"
        )
    split = record["split"]
    if split not in CUHK_PEDES_SPLITS:
        raise CaptionflowError(f"{where} has split {split!r}; expected one of {', '.join(CUHK_PEDES_SPLITS)}")
    captions = record["captions"]
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise CaptionflowError(f"{where} has 'captions' that are not a list of strings")
    if not captions:
        raise CaptionflowError(f"{where} has no captions")
    token_lists = record.get("processed_tokens")
    if token_lists is None:
        token_lists = [[] for _ in captions]  # no field: every caption is tokenized from its raw text
    elif not isinstance(token_lists, list) or not all(
        isinstance(t, list) and all(isinstance(w, str) for w in t) for t in token_lists
    ):
        raise CaptionflowError(f"{where} has 'processed_tokens' that are not a list of token lists")
    elif len(token_lists) != len(captions):
        raise CaptionflowError(
            f"{where} has {len(captions)} captions but {len(token_lists)} 'processed_tokens' lists; "
            "they must pair up one to one"
        )
    sentences = []
    for j, (raw, tokens) in enumerate(zip(captions, token_lists)):
        tokens = [w for t in tokens for w in t.split()] or tokenize(raw)
        if not tokens:
            raise CaptionflowError(f"{where}: captions[{j}] has no word (raw text {raw!r}, no tokens)")
        sentences.append({"tokens": tokens, "raw": raw, "imgid": None, "sentid": None})
    return {
        "filepath": filepath,
        "filename": filename,
        "split": split,
        "imgid": None,
        "cocoid": None,
        "person_id": person_id,
        "sentences": sentences,
        "sentids": None,
    }


def _split_path(file_path, where):
    """`file_path` -> (folder, file name), refusing a path that could leave the images folder."""
    if not isinstance(file_path, str) or not file_path.strip() or "\0" in file_path:
        raise CaptionflowError(f"{where} has 'file_path' {file_path!r}; expected a path relative to the images folder")
    # Backslashes count as separators here so that a Windows-made "..\\x.png" is refused too.
    parts = re.split(r"[\\/]", file_path)
    if file_path.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", file_path) or ".." in parts:
        raise CaptionflowError(
            f"{where} has 'file_path' {file_path!r}, which is absolute or has a '..' part; "
            "paths must stay inside the images folder (like 'CUHK01/0363004.png')"
        )
    relative = PurePosixPath(file_path)  # drops '.' parts and doubled slashes
    if file_path.endswith(("/", "\\")) or not relative.name or relative.name == ".":
        raise CaptionflowError(f"{where} has 'file_path' {file_path!r}, which names a folder, not an image file")
    folder = str(relative.parent)
    return ("" if folder == "." else folder), relative.name


# Words for the generated demo file: one outfit per identity, so that all images of a person
# are described alike (what identity-aware retrieval rewards) while captions still differ.
_PEOPLE = ("man", "woman", "young man", "young woman", "girl", "boy")
_RGB = {
    "black": (20, 20, 20),
    "white": (235, 235, 235),
    "red": (200, 30, 30),
    "blue": (30, 60, 200),
    "green": (30, 150, 50),
    "grey": (128, 128, 128),
    "yellow": (230, 210, 40),
    "brown": (120, 70, 30),
    "pink": (240, 140, 180),
}
_COLOURS = tuple(_RGB)
_TOPS = ("shirt", "t-shirt", "jacket", "sweater", "coat", "hoodie")
_BOTTOMS = ("jeans", "trousers", "shorts", "skirt", "pants")
_SHOES = ("sneakers", "boots", "sandals", "shoes")
_CARRIES = ("a backpack", "a handbag", "a shoulder bag", "nothing in the hands", "a phone")
_CAMERAS = ("CUHK01", "CUHK03", "Market", "VIPER", "i-LIDS")


def write_demo_reid_raw(path, n_ids=12, images_per_id=3, seed=0, images_root=None):
    """Write a generated `reid_raw.json` in the real CUHK-PEDES field layout and return its path.

    `n_ids` identities with `images_per_id` images each (file paths like
    "CUHK01/0007002.png"), two captions per image describing the identity's outfit.
    Splits are by identity, as in CUHK-PEDES: the last ~1/6 of identities are test, the
    ~1/6 before them val (at least one each once there are 3 identities).
    images_root: also draw each image there (a pedestrian-shaped crop whose top, bottom
    and shoes have the described colours, pose and background varying per image).
    """
    draw_rng = np.random.default_rng(seed)
    rng = random.Random(seed)
    n_test = max(1, n_ids // 6) if n_ids >= 3 else 0
    n_val = max(1, n_ids // 6) if n_ids >= 3 else 0
    ids = rng.sample(range(1, 20 * n_ids + 1), n_ids)  # identities are not 0..n-1 in the real file
    records = []
    for rank, person_id in enumerate(ids):
        split = "test" if rank >= n_ids - n_test else "val" if rank >= n_ids - n_test - n_val else "train"
        person, top, bottom, shoes, carry = (rng.choice(w) for w in (_PEOPLE, _TOPS, _BOTTOMS, _SHOES, _CARRIES))
        top_colour, bottom_colour, shoe_colour = rng.sample(_COLOURS, 3)
        camera = rng.choice(_CAMERAS)
        for k in range(images_per_id):
            captions = [
                f"The {person} is wearing a {top_colour} {top} and {bottom_colour} {bottom}, with {shoe_colour} {shoes}.",
                f"A {person} in {bottom_colour} {bottom} and a {top_colour} {top} carries {carry}. "
                f"{rng.choice(('He', 'She', 'The person'))} is {rng.choice(('walking', 'standing', 'looking down'))}.",
            ]
            rng.shuffle(captions)
            if images_root is not None:
                _draw_person(
                    Path(images_root) / f"{camera}/{person_id:04d}{k:03d}.png",
                    draw_rng,
                    top_colour,
                    bottom_colour,
                    shoe_colour,
                )
            records.append(
                {
                    "split": split,
                    "captions": captions,
                    "file_path": f"{camera}/{person_id:04d}{k:03d}.png",
                    "processed_tokens": [tokenize(c) for c in captions],
                    "id": person_id,
                }
            )
    write_json(path, records)
    return Path(path)


def _draw_person(path, rng, top, bottom, shoes, width=48, height=112):
    """A tall crop: noisy background, head, then top, bottom and shoes in their colours."""
    pixels = rng.integers(60, 190, 3)[None, None] + rng.normal(0, 12, (height, width, 3))
    img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    cx, w = width // 2 + int(rng.integers(-4, 5)), int(rng.integers(14, 20))
    y = [int(height * f) + int(rng.integers(-3, 4)) for f in (0.05, 0.22, 0.55, 0.86, 0.95)]
    draw.ellipse((cx - 6, y[0], cx + 6, y[1]), fill=(220, 180, 150))
    for (y0, y1), colour in zip(((y[1], y[2]), (y[2], y[3]), (y[3], y[4])), (top, bottom, shoes)):
        jitter = rng.integers(-15, 16, 3)
        draw.rectangle(
            (cx - w, y0, cx + w, y1), fill=tuple(int(c) for c in np.clip(np.add(_RGB[colour], jitter), 0, 255))
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
