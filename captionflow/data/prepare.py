"""`captionflow prepare`: convert your own captions into the Karpathy-schema caption file
that the workflow reads (`data.source: karpathy`, see docs/own-data.md).

Inputs, one reader each (one or several inputs, of any of these kinds, in one call):

    COCO      captions_*.json: `images` [{id, file_name}], `annotations` [{image_id, caption}]
    CSV       *.csv with a header naming `image` and `caption` (and optionally `split`)
              columns; one row per caption, so an image has as many rows as captions
    JSON Lines *.jsonl: one {"image": ..., "caption": ...[, "split": ...]} object per line
    folder    a folder of images (searched recursively) with one `<name>.txt` beside each
              image `<name>.<ext>`, one caption per line

Image paths are relative to the images root (`--images-root`, which becomes
`data.images_root`); a path that is absolute or has a `..` part is refused, like the
workflow refuses one. Every problem with one record is one line naming its position
(`file:line`, `file: annotations[i]`, a sidecar's path) and the record is left out; the
file is then written only with `--skip-bad`, so that no caption is lost unnoticed.
A problem with a whole input (not UTF-8, not JSON, no header) is a CaptionflowError.

Splits: a split the source gives (a `split` column or key; `captions_train*.json` is
train) is kept. The other images form a pool from which `--val` and `--test` images are
drawn, seeded; the rest of the pool is train, except that the images of a
`captions_val*.json` become restval, which is how Karpathy split COCO 2014 (val and test
cut out of val2014, the rest of it restval).
"""

import argparse
import csv
import io
import json
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from captionflow.data.karpathy import KARPATHY_SPLITS, _read_json, tokenize
from captionflow.data.resize import IMAGE_SUFFIXES
from captionflow.errors import CaptionflowError
from captionflow.utils.io import write_json

DESCRIPTION = "Convert COCO captions_*.json, CSV, JSON Lines or a folder of images with .txt captions to the Karpathy-schema caption file the workflow reads."


@dataclass
class Listing:
    """One image as one input lists it, with the captions that input gives it."""

    path: str  # relative to the images root, '/'-separated, normalised ("a/./b.jpg" -> "a/b.jpg")
    where: str  # where the input lists the image, for messages
    captions: list = field(default_factory=list)  # [(where, raw text)]
    split: str | None = None  # given by the source; None: drawn from the pool by --val/--test
    rest: str = "train"  # the split of a pool image that is drawn for neither val nor test
    coco_id: int | None = None


def amount(text):
    """An argparse type for --val/--test: a count ("500") or a fraction of the pool ("0.1")."""
    try:
        value = float(text) if "." in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a count such as 500 or a fraction such as 0.1, got {text!r}"
        ) from None
    if value < 0 or (isinstance(value, float) and value >= 1):
        raise argparse.ArgumentTypeError(f"expected a count >= 0 or a fraction in [0, 1), got {text!r}")
    return value


# --- readers: one per input format; each returns [Listing] and appends one line per bad record


def read_coco(path, images_root, problems):
    """A COCO `captions_*.json` -> its images with their annotations' captions.

    Images are looked for in `<images_root>/<name>/` for a file `captions_<name>.json`
    when that folder exists (COCO ships captions_train2014.json for train2014/), else in
    the images root itself.
    """
    path = Path(path)
    data = _read_json(path, f"COCO file {path}")
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise CaptionflowError(
            f"COCO file {path}: expected an object with 'images' and 'annotations' lists (COCO captions_*.json)"
        )
    name = path.stem.removeprefix("captions_")
    folder = name if (Path(images_root) / name).is_dir() else ""
    split, rest = _coco_split(path.stem)
    by_id, by_name, rejected = {}, {}, set()  # rejected: ids of images already named as bad
    for j, img in enumerate(data["images"]):
        where = f"{path}: images[{j}]"
        image_id, file_name = (img.get("id"), img.get("file_name")) if isinstance(img, dict) else (None, None)
        if not isinstance(image_id, int) or isinstance(image_id, bool) or not isinstance(file_name, str):
            problems.append(f"{where}: expected an object with an integer 'id' and a 'file_name' string")
            rejected.add(image_id if isinstance(image_id, int) else None)
        elif image_id in by_id:
            problems.append(f"{where}: id {image_id} is listed twice (also {by_id[image_id].where})")
        elif file_name in by_name:
            problems.append(f"{where}: image {file_name} is listed twice (also {by_name[file_name].where})")
        else:
            rel = _relative(f"{folder}/{file_name}" if folder else file_name, where, problems)
            if rel is not None:
                by_id[image_id] = by_name[file_name] = Listing(rel, where, split=split, rest=rest, coco_id=image_id)
            else:
                rejected.add(image_id)
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]"
        image_id, caption = (ann.get("image_id"), ann.get("caption")) if isinstance(ann, dict) else (None, None)
        if not isinstance(caption, str):
            problems.append(f"{where}: expected an object with an 'image_id' and a 'caption' string")
        elif image_id in rejected and image_id not in by_id:
            continue  # its image is named already: one line, not one per caption
        elif image_id not in by_id:
            problems.append(f"{where}: image_id {image_id!r} is not an id of the file's images")
        else:
            by_id[image_id].captions.append((where, caption))
    for listing in by_id.values():
        if not listing.captions:
            problems.append(f"{listing.where}: image {listing.path} has no caption in 'annotations'")
    return [listing for listing in by_id.values() if listing.captions]


def _coco_split(stem):
    """(split, rest) for the images of a COCO file, from its name (see the module docstring)."""
    stem = stem.lower()
    if "train" in stem:
        return "train", "train"
    if "val" in stem:
        return None, "restval"
    if "test" in stem:
        return "test", "test"
    return None, "train"


def read_csv(path, problems):
    """A CSV file with `image` and `caption` columns (and optionally `split`) -> its images.

    Rows name their first line (a quoted caption may span lines); blank rows are skipped.
    """
    path = Path(path)
    reader = csv.reader(io.StringIO(_read_text(path, f"CSV file {path}"), newline=""))
    rows, line, columns = [], 1, None
    try:
        for row in reader:
            start, line = line, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if columns is None:
                columns = [cell.strip().lower() for cell in row]
                if not {"image", "caption"} <= set(columns):
                    raise CaptionflowError(
                        f"CSV file {path}:{start}: header {row} has no 'image' and 'caption' columns"
                    )
            elif len(row) != len(columns):
                problems.append(f"{path}:{start}: {len(row)} fields, expected {len(columns)} ({','.join(columns)})")
            else:
                cells = dict(zip(columns, row))
                rows.append((f"{path}:{start}", cells["image"], cells["caption"], cells.get("split", "")))
    except csv.Error as exc:
        raise CaptionflowError(f"CSV file {path}:{reader.line_num}: not CSV ({exc})") from None
    if columns is None:
        raise CaptionflowError(f"CSV file {path}: empty (expected a header with 'image' and 'caption' columns)")
    return _group(rows, problems)


def read_jsonl(path, problems):
    """A JSON Lines file of {"image", "caption"[, "split"]} objects -> its images."""
    path = Path(path)
    rows = []
    for n, line in enumerate(_read_text(path, f"JSON Lines file {path}").split("\n"), 1):
        where = f"{path}:{n}"
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not a JSON object ({exc.msg} at column {exc.colno})")
            continue
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("image"), str)
            or not isinstance(record.get("caption"), str)
        ):
            problems.append(f'{where}: expected an object with "image" and "caption" strings')
        elif not isinstance(record.get("split") or "", str):
            problems.append(f'{where}: "split" is {record["split"]!r}; expected one of {", ".join(KARPATHY_SPLITS)}')
        else:
            rows.append((where, record["image"], record["caption"], record.get("split") or ""))
    return _group(rows, problems)


def _group(rows, problems):
    """[(where, image, caption, split)] rows -> one Listing per image, rows in file order."""
    listings = {}
    for where, image, caption, split in rows:
        split = split.strip() or None
        if split is not None and split not in KARPATHY_SPLITS:
            problems.append(f"{where}: split {split!r}; expected one of {', '.join(KARPATHY_SPLITS)} or nothing")
            continue
        rel = _relative(image.strip(), where, problems)
        if rel is None:
            continue
        listing = listings.setdefault(rel, Listing(rel, where, split=split))
        if listing.split != split:
            problems.append(
                f"{where}: image {rel} has split {split or 'none'} here but {listing.split or 'none'} at {listing.where}"
            )
            continue
        listing.captions.append((where, caption))
    return list(listings.values())


def read_folder(folder, images_root, problems):
    """A folder of images, each with a `<name>.txt` of captions (one per line) beside it.

    Hidden files and folders are skipped; a sidecar without an image, or two images that
    share one sidecar (a.jpg and a.png), are bad records too.
    """
    folder, root = Path(folder), Path(images_root)
    if os.path.relpath(os.path.abspath(folder), os.path.abspath(root)).split(os.sep)[0] == "..":
        raise CaptionflowError(
            f"folder {folder} is not inside the images root {root}; pass --images-root a folder above it"
        )
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    sidecars = {p.with_suffix(""): p for p in files if p.suffix.lower() == ".txt"}
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    listings, claimed = [], {}
    for image in images:
        key = image.with_suffix("")
        sidecar = sidecars.get(key)
        if sidecar is None:
            problems.append(f"{image}: no caption file {image.stem}.txt beside it")
            continue
        if key in claimed:
            problems.append(f"{sidecar}: the caption file of both {claimed[key]} and {image}; rename one of them")
            continue
        claimed[key] = image
        try:
            lines = _read_text(sidecar, str(sidecar)).split("\n")
        except CaptionflowError as exc:
            problems.append(str(exc))
            continue
        captions = [(f"{sidecar}:{n}", line) for n, line in enumerate(lines, 1) if line.strip()]
        if not captions:
            problems.append(f"{sidecar}: empty; expected one caption per line")
            continue
        rel = PurePosixPath(*Path(os.path.relpath(os.path.abspath(image), os.path.abspath(root))).parts)
        listings.append(Listing(str(rel), str(image), captions))
    image_keys = {image.with_suffix("") for image in images}
    for key, sidecar in sidecars.items():
        if key not in image_keys:
            problems.append(f"{sidecar}: no image {key.name}.jpg (or .png, ...) beside it")
    return listings


def _read_text(path, where):
    """The UTF-8 text of `path` (a leading byte-order mark dropped); one line if unreadable."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise CaptionflowError(f"{where}: does not exist") from None
    except OSError as exc:
        raise CaptionflowError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CaptionflowError(
            f"{where}: not UTF-8 text (byte {exc.start}: {raw[exc.start : exc.start + 1]!r}); save it as UTF-8"
        ) from None


def _relative(image, where, problems):
    """`image` as a normalised path relative to the images root, or None (a problem noted)
    when it is empty, absolute or has a `..` part: the workflow reads nothing outside the root."""
    parts = re.split(r"[\\/]", image)
    if not image or image.endswith(("/", "\\")) or "\0" in image:
        problems.append(f"{where}: image {image!r} is not a file name")
    elif image.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", image) or ".." in parts:
        problems.append(
            f"{where}: image {image!r} is absolute or has a '..' part; paths are relative to the images root"
        )
    else:
        return str(PurePosixPath(*[p for p in parts if p not in ("", ".")]))
    return None


# --- from listings to the caption file


def merge(listings, images_root, problems):
    """Listings of all inputs -> one Listing per image (by path), captions tokenised.

    An image listed by several inputs gets all their captions (a split that disagrees is a
    bad record); an image not found under the root, and a caption without a word, are bad
    records. Captions of one image with the same words are kept once.
    Returns (images, stats): images as [(Listing, [(tokens, raw)])].
    """
    merged = {}
    for listing in listings:
        have = merged.setdefault(
            listing.path, Listing(listing.path, listing.where, [], listing.split, listing.rest, listing.coco_id)
        )
        if have.split != listing.split:
            problems.append(
                f"{listing.where}: image {listing.path} has split {listing.split or 'none'} here but {have.split or 'none'} at {have.where}"
            )
        else:
            have.captions += listing.captions
    images, stats = [], {"duplicate_captions": 0, "non_ascii": 0, "uncaptioned": 0}
    for image in merged.values():
        if not os.path.isfile(os.path.join(images_root, image.path)):
            problems.append(
                f"{image.where}: image {image.path} not found under the images root {images_root} ({len(image.captions)} captions left out)"
            )
            continue
        sentences, seen = [], set()
        for where, raw in image.captions:
            raw = " ".join(raw.split())  # one line: the evaluation's tokenizer reads captions line by line
            tokens = tokenize(raw)
            if not tokens:
                problems.append(f"{where}: caption {raw!r} of {image.path} has no word")
            elif tuple(tokens) in seen:
                stats["duplicate_captions"] += 1
            else:
                seen.add(tuple(tokens))
                sentences.append((tokens, raw))
                stats["non_ascii"] += not raw.isascii()
        if sentences:
            images.append((image, sentences))
        else:
            stats["uncaptioned"] += 1
    return images, stats


def assign_splits(images, val, test, seed):
    """The split of every image: the source's, or drawn from the pool (images without one).

    val, test: counts, or fractions of the pool (rounded; at least 1 when above 0). The
    pool is sorted by path before a seeded shuffle, so the draw does not depend on the
    order of the inputs. Returns [split] in the order of `images`.
    """
    pool = sorted((i for i, (image, _) in enumerate(images) if image.split is None), key=lambda i: images[i][0].path)
    random.Random(seed).shuffle(pool)
    n_test, n_val = _count(test, len(pool)), _count(val, len(pool))
    if n_test + n_val > len(pool):
        raise CaptionflowError(
            f"--val {val} and --test {test} ask for {n_val} + {n_test} images, but only {len(pool)} images have no split from their source"
        )
    splits = [image.split for image, _ in images]
    for k, i in enumerate(pool):
        splits[i] = "test" if k < n_test else "val" if k < n_test + n_val else images[i][0].rest
    return splits


def _count(amount, n):
    if isinstance(amount, float):
        return max(1, round(amount * n)) if amount > 0 and n else 0
    return amount


def karpathy_dataset(images, splits):
    """The caption file's content: Karpathy's `dataset_coco.json` layout.

    imgid is the running image index and sentid the running caption index; cocoid is kept
    only when every image has a distinct COCO id (else the loader's ids could collide).
    """
    ids = [image.coco_id for image, _ in images]
    keep_coco = None not in ids and len(set(ids)) == len(ids)
    out, sentid = [], 0
    for imgid, ((image, sentences), split) in enumerate(zip(images, splits)):
        folder, name = os.path.split(image.path)
        sents = [
            {"tokens": tokens, "raw": raw, "imgid": imgid, "sentid": sentid + j}
            for j, (tokens, raw) in enumerate(sentences)
        ]
        sentid += len(sents)
        record = {
            "filepath": folder,
            "filename": name,
            "imgid": imgid,
            "split": split,
            "sentids": [s["sentid"] for s in sents],
            "sentences": sents,
        }
        if keep_coco:
            record["cocoid"] = image.coco_id
        out.append(record)
    return {"dataset": "captionflow-prepare", "images": out}


def convert(inputs, images_root, val=0.1, test=0.1, seed=0):
    """Read every input -> (caption file content, [bad record line], stats). Writes nothing.

    inputs: COCO *.json, *.csv, *.jsonl files and image folders, told apart by suffix.
    """
    problems, listings = [], []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            listings += read_folder(path, images_root, problems)
        elif path.suffix.lower() == ".json":
            listings += read_coco(path, images_root, problems)
        elif path.suffix.lower() == ".csv":
            listings += read_csv(path, problems)
        elif path.suffix.lower() == ".jsonl":
            listings += read_jsonl(path, problems)
        elif not path.exists():
            raise CaptionflowError(f"input {path}: no such file or folder")
        else:
            raise CaptionflowError(f"input {path}: expected a COCO .json, a .csv, a .jsonl or a folder of images")
    images, stats = merge(listings, images_root, problems)
    if not images:
        first = f", the first: {problems[0]}" if problems else ""
        raise CaptionflowError(
            f"no image with a usable caption in {', '.join(map(str, inputs))} ({len(problems)} bad records{first})"
        )
    splits = assign_splits(images, val, test, seed)
    if not {"train", "restval"} & set(splits):
        raise CaptionflowError(
            f"no image is left for training ({len(images)} images, all in val or test): lower --val/--test"
        )
    return karpathy_dataset(images, splits), problems, stats


def write_dataset(out_json, dataset, inputs):
    """Write the caption file atomically (a sibling temp file renamed onto `out_json`)."""
    check_output(out_json, inputs)
    write_json(out_json, dataset)


def check_output(out_json, inputs):
    """Refuse an output name that is not *.json, in a folder that does not exist, or one of the inputs."""
    out = Path(out_json)
    if out.suffix.lower() != ".json":
        raise CaptionflowError(f"output {out}: expected a .json file name")
    if not out.parent.is_dir():
        raise CaptionflowError(f"output {out}: folder {out.parent} does not exist")
    for name in inputs:
        if out.exists() and out.resolve() == Path(name).resolve():
            raise CaptionflowError(f"output {out} is one of the inputs; write the caption file elsewhere")


def add_arguments(p):
    """The options of `captionflow prepare` (shared by the CLI and `main`)."""
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="COCO captions_*.json, .csv, .jsonl files or image folders with .txt sidecars",
    )
    p.add_argument(
        "--output", "-o", required=True, metavar="OUT.json", help="the caption file to write (data.karpathy_json)"
    )
    p.add_argument(
        "--images-root",
        default=None,
        metavar="DIR",
        help="folder the image paths are relative to (data.images_root); default: the folder, for one folder input",
    )
    p.add_argument(
        "--val",
        type=amount,
        default=0.1,
        help="images drawn for val from those without a split: a count, or a fraction (default 0.1)",
    )
    p.add_argument("--test", type=amount, default=0.1, help="the same for test (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seeds the val/test draw (default 0)")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="write the file without the bad records (each named on stderr) and exit 0",
    )


def run(args):
    """Convert, name every bad record on stderr, write the file, print a summary. -> exit status."""
    err = sys.stderr
    root = args.images_root
    if root is None:
        if len(args.inputs) != 1 or not Path(args.inputs[0]).is_dir():
            raise CaptionflowError(
                "--images-root is needed (the folder the image paths are relative to), except for one folder input"
            )
        root = args.inputs[0]
    if not Path(root).is_dir():
        raise CaptionflowError(f"--images-root {root}: no such folder")
    check_output(args.output, args.inputs)  # before reading: a wrong name costs nothing
    dataset, problems, stats = convert(args.inputs, root, args.val, args.test, args.seed)
    for line in problems:
        print(f"captionflow prepare: {line}", file=err)
    images = dataset["images"]
    splits = {s: sum(img["split"] == s for img in images) for s in KARPATHY_SPLITS}
    print(
        f"captionflow prepare: {len(images)} images, {sum(len(img['sentences']) for img in images)} captions "
        f"({', '.join(f'{s} {n}' for s, n in splits.items())}); {len(problems)} bad records; "
        f"{stats['duplicate_captions']} duplicate captions dropped; {stats['uncaptioned']} images left without a caption",
        file=err,
    )
    empty = [s for s in ("val", "test") if not splits[s]]
    if empty:
        print(
            f"captionflow prepare: warning: no {' and no '.join(empty)} images; the workflow needs train, val and test images (--val, --test)",
            file=err,
        )
    if stats["non_ascii"]:
        print(
            f"captionflow prepare: warning: {stats['non_ascii']} captions have non-ASCII characters: their tokens keep only the words of a-z and 0-9 (captionflow.data.karpathy.tokenize)",
            file=err,
        )
    if problems and not args.skip_bad:
        print(
            f"captionflow prepare: nothing written to {args.output}: fix the {len(problems)} records named above, or pass --skip-bad to leave them out",
            file=err,
        )
        return 1
    write_dataset(args.output, dataset, args.inputs)
    print(
        f"captionflow prepare: wrote {args.output}; in config.yaml: data: {{source: karpathy, "
        f"karpathy_json: {os.path.abspath(args.output)}, images_root: {os.path.abspath(root)}}}",
        file=err,
    )
    return 0


def add_parser(subparsers):
    """Register `prepare` on the `captionflow` command's subparsers."""
    p = subparsers.add_parser(
        "prepare", help="convert your own captions to the caption file the workflow reads", description=DESCRIPTION
    )
    add_arguments(p)
    p.set_defaults(run=run)
    return p


def main(argv=None):
    """`captionflow prepare` on its own (what tests and scripts call) -> exit status."""
    p = argparse.ArgumentParser(prog="captionflow prepare", description=DESCRIPTION)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except CaptionflowError as exc:
        print(f"captionflow prepare: {exc}", file=sys.stderr)
        return 2
