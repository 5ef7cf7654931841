"""Read and validate a caption file in Karpathy's `dataset_coco.json` schema.

The schema (also used for Flickr8k/30k): a top-level `images` list; each image has
`filepath` (folder under the images root, may be empty), `filename`, `imgid`, `cocoid`
(COCO only), `split` in train/restval/val/test, and `sentences`, each with `tokens`
(lower-cased words) and `raw` text. Every problem is reported as one line naming the file
and the offending record (a byte offset or line for text that is not UTF-8 or not JSON).
Tokens are split on whitespace, so blank or whitespace-only tokens never reach a vocabulary.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

from captionflow.errors import CaptionflowError

KARPATHY_SPLITS = ("train", "restval", "val", "test")
# A file name that Path(folder) / name joins as prefix + name on every system: no separator,
# drive or NUL (and not "."). Others take the full check's Path join.
_PLAIN_NAME = re.compile(r"[^/\\:\0]+")


@dataclass(frozen=True)
class ImageRecord:
    """One image of the caption file."""

    id: int  # cocoid when present (COCO), else imgid (Flickr)
    file_path: str  # relative to the images root: filepath/filename
    split: str
    captions: tuple  # tuple of token tuples
    raw: tuple  # the raw caption strings (tokens joined where a file has no raw text)
    person_id: int | None = None  # person search (CUHK-PEDES): the identity; all its images match


def tokenize(raw):
    """Lower-case words of a raw caption, punctuation dropped (for files without tokens)."""
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", raw.lower())


def load_karpathy(path):
    """Parse `path` -> list of ImageRecord, in file order. Raises CaptionflowError."""
    path = Path(path)
    where = f"captions file {path}"
    data = _read_json(path, where)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        found = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
        raise CaptionflowError(
            f"{where}: expected a top-level object with an 'images' list (Karpathy dataset_*.json schema), found {found}"
        )
    if not data["images"]:
        raise CaptionflowError(f"{where}: the 'images' list is empty")
    records, seen, prefixes = [], {}, {}
    for i, img in enumerate(data["images"]):
        # The common record takes the quick path; any other one (a wrong shape, raw-only
        # sentences, blank tokens) the full check, which accepts it or names the problem.
        rec = _quick_image(img, prefixes) or _parse_image(img, f"{where}: images[{i}]")
        if seen.setdefault(rec.id, i) != i:
            raise CaptionflowError(f"{where}: images[{i}] has the same id {rec.id} as images[{seen[rec.id]}]")
        records.append(rec)
    return records


def _read_json(path, where):
    """The parsed JSON of `path`; unreadable, non-UTF-8 or non-JSON text is one line."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CaptionflowError(f"{where}: does not exist") from None
    except OSError as exc:
        raise CaptionflowError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark is tolerated
    except UnicodeDecodeError as exc:
        raise CaptionflowError(
            f"{where}: not UTF-8 text (byte {exc.start}: {raw[exc.start : exc.start + 1]!r}); "
            "save it as UTF-8 (Karpathy's files are)"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CaptionflowError(f"{where}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise CaptionflowError(f"{where}: not a caption file (JSON nested too deeply)") from None


def _quick_image(img, prefixes):
    """The ImageRecord `_parse_image` would return for a record in the usual shape (exact
    types, token lists of words), found with cheap type checks; None for any other record.

    prefixes caches {filepath: what Path(filepath) / name puts before a plain file name}.
    """
    if type(img) is not dict:
        return None
    filename, filepath = img.get("filename"), img.get("filepath") or ""
    image_id, split, sentences = img.get("cocoid", img.get("imgid")), img.get("split"), img.get("sentences")
    person_id = img.get("person_id")
    if not (
        type(filename) is str
        and _PLAIN_NAME.fullmatch(filename)
        and filename != "."
        and type(filepath) is str
        and "\0" not in filepath
        and type(image_id) is int
        and type(split) is str
        and split in KARPATHY_SPLITS
        and type(sentences) is list
        and sentences
        and (person_id is None or type(person_id) is int)
    ):
        return None
    captions, raw = [], []
    for sent in sentences:
        tokens = sent.get("tokens") if type(sent) is dict else None
        if type(tokens) is not list:
            return None
        try:
            # the words of the tokens, as _parse_image splits them; a non-string token fails the join
            words = " ".join(tokens).split()
        except TypeError:
            return None
        if not words:
            return None
        text = sent.get("raw")
        captions.append(tuple(words))
        raw.append(text if isinstance(text, str) else " ".join(words))
    if filepath not in prefixes:
        prefixes[filepath] = str(Path(filepath) / "x")[:-1]
    return ImageRecord(image_id, prefixes[filepath] + filename, split, tuple(captions), tuple(raw), person_id)


def _parse_image(img, where):
    """The full check of one image record -> ImageRecord; any problem is one line naming `where`."""
    if not isinstance(img, dict):
        raise CaptionflowError(f"{where} is a {type(img).__name__}, expected an object")
    if "filename" not in img:
        raise CaptionflowError(f"{where} has no 'filename'")
    filename, filepath = img["filename"], img.get("filepath") or ""
    if not isinstance(filename, str) or not filename or "\0" in filename:
        raise CaptionflowError(f"{where} has 'filename' {filename!r}; expected a non-empty file name")
    if not isinstance(filepath, str) or "\0" in filepath:
        raise CaptionflowError(f"{where} ({filename}) has 'filepath' {filepath!r}; expected a folder name or nothing")
    image_id = img.get("cocoid", img.get("imgid"))
    if not isinstance(image_id, int) or isinstance(image_id, bool):
        raise CaptionflowError(f"{where} ({filename}) has no integer 'cocoid' or 'imgid'")
    where = f"{where} (id {image_id}, {img['filename']})"
    split = img.get("split")
    if split not in KARPATHY_SPLITS:
        raise CaptionflowError(f"{where} has split {split!r}; expected one of {', '.join(KARPATHY_SPLITS)}")
    sentences = img.get("sentences")
    if not isinstance(sentences, list) or not sentences:
        raise CaptionflowError(f"{where} has no sentences")
    captions, raw = [], []
    for j, sent in enumerate(sentences):
        tokens = sent.get("tokens") if isinstance(sent, dict) else None
        if tokens is None and isinstance(sent, dict) and isinstance(sent.get("raw"), str):
            tokens = tokenize(sent["raw"])
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise CaptionflowError(f"{where}: sentences[{j}] has neither a 'tokens' list of strings nor a 'raw' string")
        tokens = [w for t in tokens for w in t.split()]  # '' and ' ' are no words; 'a b' is two
        if not tokens:
            raise CaptionflowError(f"{where}: sentences[{j}] is empty (no word in its tokens)")
        captions.append(tuple(tokens))
        raw.append(sent["raw"] if isinstance(sent.get("raw"), str) else " ".join(tokens))
    person_id = img.get("person_id")
    if person_id is not None and (not isinstance(person_id, int) or isinstance(person_id, bool)):
        raise CaptionflowError(f"{where} has 'person_id' {person_id!r}; expected an integer identity or no such key")
    file_path = str(Path(filepath) / filename)
    return ImageRecord(image_id, file_path, split, tuple(captions), tuple(raw), person_id)
