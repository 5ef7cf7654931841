"""Stage import_bottomup: Anderson et al.'s bottom-up-attention TSV release -> region HDF5.

Anderson et al., "Bottom-Up and Top-Down Attention for Image Captioning and Visual
Question Answering" (CVPR 2018) released Faster R-CNN (Visual Genome) region features of
COCO as TSV files (e.g. the four `trainval` shards), one image a line, no header:
    image_id  image_w  image_h  num_boxes  boxes  features
`boxes` is base64 of float32 (num_boxes, 4), x1 y1 x2 y2 in pixels; `features` is base64
of float32 (num_boxes, D), D = 2048. Releases have 36 boxes an image, or 10 to 100
(adaptive). `write_bottomup_tsv` writes the same format (for tests, or for users
converting their own detections).

Region HDF5 layout, one file per split, rows in the order of the split's images in the
labels JSON (`regions.extract_regions` writes the same layout):
    att        (N, R, D)  region features, zero past num_boxes; R = max_boxes
    att_mask   (N, R)     bool, True for a real region
    fc         (N, D)     mean over the real regions only
    boxes      (N, R, 4)  float32 x1 y1 x2 y2 divided by image width / height, clipped
                          to [0, 1]; zero past num_boxes
    num_boxes  (N,)       int32 real regions of each image
    image_id   (N,)       int64 image ids, to check the order against the labels JSON
att and fc are float32 or float16 (`dtype`). R is allocated up front, so pass
max_boxes=36 for the fixed-36 release (the default 100 fits the adaptive one and pads the
fixed one to 100, almost 3x the disk).

Streaming: one pass over the TSV files writes each line straight into its split's row of
`<out>.partial` (captionflow.utils.h5: datasets allocated up front); only the features of
images in the requested splits are decoded, nothing is held beyond one line.
Resumable: every `chunk_rows` lines the partial files are flushed and each
`<out>.partial.json` records the TSV file and byte offset reached; a rerun with the same
inputs seeks there and continues. A hidden dataset `_source_row` (the global TSV line
that filled each row, -1 before) finds images missing from the TSV and images listed
twice, also across a resume; `finish` deletes it before the final rename onto `<out>`.
Compressed TSVs are not read: unzip the release first (seeking needs plain files).
"""

import base64
import binascii
import csv
import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from captionflow.errors import CaptionflowError
from captionflow.features.extract import DTYPES
from captionflow.utils.h5 import commit, create_partial, finish, ids_digest, partial_paths, saved_state, write_rows
from captionflow.utils.io import atomic_path, file_stamp

FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")


# ---- the region HDF5 layout (shared with regions.py) ----------------------------------


def region_datasets(n, max_boxes, dim, dtype):
    """{name: (shape, numpy dtype)} of the layout's per-image datasets (image_id aside)."""
    return {
        "att": ((n, max_boxes, dim), DTYPES[dtype]),
        "att_mask": ((n, max_boxes), np.bool_),
        "fc": ((n, dim), DTYPES[dtype]),
        "boxes": ((n, max_boxes, 4), np.float32),
        "num_boxes": ((n,), np.int32),
    }


def region_rows(feats, boxes, max_boxes, dtype, where):
    """Real regions of B images -> their zero-padded rows of the layout.

    feats: B arrays (K_i, D) float32; boxes: B arrays (K_i, 4) normalised; K_i <= max_boxes.
    -> {"att": (B, R, D), "att_mask": (B, R), "fc": (B, D), "boxes": (B, R, 4), "num_boxes": (B,)}
    where: names the images in the error raised when features overflow `dtype`.
    """
    b, dim = len(feats), feats[0].shape[1]
    rows = {
        "att": np.zeros((b, max_boxes, dim), np.float32),
        "att_mask": np.zeros((b, max_boxes), np.bool_),
        "fc": np.zeros((b, dim), np.float32),
        "boxes": np.zeros((b, max_boxes, 4), np.float32),
        "num_boxes": np.zeros(b, np.int32),
    }
    for i, (f, bx) in enumerate(zip(feats, boxes)):
        k = len(f)
        rows["att"][i, :k] = f
        rows["att_mask"][i, :k] = True
        rows["fc"][i] = f.mean(axis=0)  # padding excluded
        rows["boxes"][i, :k] = bx
        rows["num_boxes"][i] = k
    if not all(np.isfinite(f).all() for f in feats):  # NaN/inf before any cast: the source's
        raise CaptionflowError(
            f"region features of {where} are NaN or inf; refused, as they would train to NaN weights: check the detector weights"
        )
    for name in ("att", "fc"):
        rows[name] = rows[name].astype(DTYPES[dtype])
        if not np.isfinite(rows[name]).all():
            big = float(np.abs(np.concatenate([f.ravel() for f in feats])).max())
            raise CaptionflowError(
                f"region features of {where} are not finite in {dtype} (max |x| = {big:.3g}); use dtype float32"
            )
    return rows


# ---- the TSV format --------------------------------------------------------------------


def write_bottomup_tsv(path, rows):
    """Write rows in the bottom-up-attention TSV format (atomically).

    rows: iterable of dicts {image_id, image_w, image_h, boxes (K, 4) pixels x1 y1 x2 y2,
    features (K, D)}; num_boxes is K. Lines end in CRLF like the reference
    `generate_tsv.py` (csv's excel dialect); arrays are stored as float32.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh, delimiter="\t")
            for row in rows:
                boxes = np.ascontiguousarray(row["boxes"], dtype=np.float32)
                feats = np.ascontiguousarray(row["features"], dtype=np.float32)
                if (
                    boxes.ndim != 2
                    or boxes.shape[1] != 4
                    or feats.ndim != 2
                    or len(feats) != len(boxes)
                    or not len(boxes)
                ):
                    raise CaptionflowError(
                        f"image {row['image_id']}: boxes {boxes.shape} and features {feats.shape} "
                        "must be (K, 4) and (K, D) with K >= 1"
                    )
                writer.writerow(
                    [
                        int(row["image_id"]),
                        int(row["image_w"]),
                        int(row["image_h"]),
                        len(boxes),
                        base64.b64encode(boxes.tobytes()).decode("ascii"),
                        base64.b64encode(feats.tobytes()).decode("ascii"),
                    ]
                )


def _fields(line, where):
    """A TSV line -> its 6 fields (bytes), or None for a blank line or a header."""
    line = line.rstrip(b"\r\n")
    if not line.strip():
        return None
    fields = line.split(b"\t")
    if fields[0] == b"image_id":
        return None  # a header some converters add
    if len(fields) < len(FIELDS):
        missing = ", ".join(repr(name) for name in FIELDS[len(fields) :])
        raise CaptionflowError(
            f"{where}: {len(fields)} tab-separated fields, expected {len(FIELDS)}: missing {missing}"
        )
    if len(fields) > len(FIELDS):
        raise CaptionflowError(
            f"{where}: {len(fields)} tab-separated fields, expected {len(FIELDS)} ({', '.join(FIELDS)})"
        )
    return fields


def _int(fields, i, where):
    try:
        return int(fields[i])
    except ValueError:
        raise CaptionflowError(f"{where}: field {FIELDS[i]!r} is not an integer ({fields[i][:20]!r})") from None


def _size(fields, i, where):
    try:
        value = float(fields[i])
    except ValueError:
        value = float("nan")
    if not (np.isfinite(value) and value > 0):
        raise CaptionflowError(f"{where}: field {FIELDS[i]!r} is not a positive number ({fields[i][:20]!r})")
    return value


def _array(fields, i, where, num_boxes, dim):
    """A base64 float32 field -> (num_boxes, dim); dim None: inferred from the length."""
    text = fields[i]
    if text.startswith(b"b'") and text.endswith(b"'"):
        text = text[2:-1]  # Python 3 ports of generate_tsv.py that wrote bytes' repr
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CaptionflowError(f"{where}: field {FIELDS[i]!r} is not valid base64 ({exc})") from None
    if dim is None:
        dim = len(raw) // (4 * num_boxes)
    if dim < 1 or len(raw) != 4 * num_boxes * dim:
        raise CaptionflowError(
            f"{where}: field {FIELDS[i]!r} holds {len(raw)} bytes, not num_boxes={num_boxes} x {dim or 'D'} float32"
        )
    return np.frombuffer(raw, dtype=np.float32).reshape(num_boxes, dim)


def parse_row(fields, where, dim, max_boxes):
    """Fields of one line -> (image_id, feats (K, D) float32, boxes (K, 4) normalised).

    dim None: D is taken from the line itself (the first line sets it for the import).
    """
    image_id = _int(fields, 0, where)
    width, height = _size(fields, 1, where), _size(fields, 2, where)
    k = _int(fields, 3, where)
    if not 1 <= k <= max_boxes:
        fix = f"; rerun with max_boxes >= {k}" if k > max_boxes else ""
        raise CaptionflowError(f"{where}: field 'num_boxes' is {k}, not in 1..max_boxes={max_boxes}{fix}")
    boxes = _array(fields, 4, where, k, 4)
    feats = _array(fields, 5, where, k, dim)
    for i, values in ((4, boxes), (5, feats)):
        if not np.isfinite(values).all():
            raise CaptionflowError(
                f"{where}: image {image_id}: field {FIELDS[i]!r} holds NaN or inf values (refused: they would "
                "train to NaN weights); fix or drop this line of the TSV"
            )
    scale = np.array([width, height, width, height], dtype=np.float32)
    return image_id, feats, np.clip(boxes / scale, 0.0, 1.0)


def _feature_dim(paths, max_boxes):
    """D of the first line of the TSV files (every later line must match it)."""
    for path in paths:
        with open(path, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                fields = _fields(line, f"{path} row {lineno}")
                if fields is not None:
                    return parse_row(fields, f"{path} row {lineno}", None, max_boxes)[1].shape[1]
    raise CaptionflowError(f"bottom-up TSV files {', '.join(map(str, paths))} hold no rows")


def _lines(paths, start):
    """Yield (file index, 1-based line number, line bytes, byte offset after it) from `start`."""
    for i in range(start["file"], len(paths)):
        first = i == start["file"]
        lineno = start["line"] if first else 0
        with open(paths[i], "rb") as fh:
            fh.seek(start["offset"] if first else 0)
            for line in iter(fh.readline, b""):
                lineno += 1
                yield i, lineno, line, fh.tell()


# ---- the import ------------------------------------------------------------------------


def import_bottomup(tsv_paths, labels_json, outputs, max_boxes=100, dtype="float32", chunk_rows=2000):
    """Import the TSV rows of each split in `outputs` ({split: HDF5 path}) into region HDF5.

    tsv_paths: one TSV path or a list (shards are read in the order given). Lines of
    images that no requested split lists are skipped. Raises CaptionflowError for a
    malformed line (file, row, field), an image listed twice, or images of the requested
    splits missing from every TSV (how many, the first ids).
    """
    if isinstance(tsv_paths, (str, os.PathLike)):
        tsv_paths = [tsv_paths]
    paths = [Path(p) for p in tsv_paths]
    if dtype not in DTYPES:
        raise CaptionflowError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if max_boxes < 1:
        raise CaptionflowError(f"max_boxes must be at least 1, not {max_boxes}")
    for path in paths:
        if not path.is_file():
            raise CaptionflowError(f"bottom-up TSV {path} does not exist")
    with open(labels_json) as fh:
        images = json.load(fh)["images"]
    split_ids = {}
    for img in images:
        split_ids.setdefault(img["split"], []).append(img["id"])
    outputs = {split: Path(out) for split, out in outputs.items()}
    for split in outputs:
        if split not in split_ids:
            raise CaptionflowError(f"split {split!r} has no images in {labels_json} (splits: {sorted(split_ids)})")
    position = {image_id: (split, row) for split in outputs for row, image_id in enumerate(split_ids[split])}

    dim = _feature_dim(paths, max_boxes)
    spec = {
        "tsv": [file_stamp(p) for p in paths],
        "splits": {s: ids_digest(split_ids[s]) for s in sorted(outputs)},
        "max_boxes": max_boxes,
        "dtype": dtype,
    }
    fingerprint = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    attrs = {
        "source": "bottomup_tsv",
        "tsv_files": json.dumps([p.name for p in paths]),
        "dtype": dtype,
        "max_boxes": max_boxes,
        "feat_dim": dim,
        "boxes_format": "x1 y1 x2 y2 / (image_w, image_h, image_w, image_h)",
    }

    files = {}
    try:
        start = _open_outputs(outputs, fingerprint, split_ids, max_boxes, dim, dtype, attrs, files)
        source_row = {s: f["_source_row"][()] for s, f in files.items()}
        _stream(paths, start, position, source_row, files, outputs, fingerprint, dim, max_boxes, dtype, chunk_rows)
        _check_complete(source_row, split_ids, labels_json, paths)
        for split, f in files.items():
            n = f["num_boxes"][()]
            f.attrs["max_num_boxes"] = int(n.max())
            finish(f, outputs[split])
            print(
                f"{split}: {len(n)} images, {n.min()}-{n.max()} boxes (mean {n.mean():.1f}), D={dim} -> {outputs[split]}",
                flush=True,
            )
    finally:
        for f in files.values():
            if f.id.valid:
                f.close()


def _open_outputs(outputs, fingerprint, split_ids, max_boxes, dim, dtype, attrs, files):
    """Reopen every output's partial file, or create all afresh; fill `files`; -> start point."""
    states = {split: saved_state(out, fingerprint) for split, out in outputs.items()}
    if all(states.values()):
        try:
            for split, out in outputs.items():
                files[split] = h5py.File(partial_paths(out)[0], "r+")
            # Outputs commit one after another: continue from the least advanced one.
            state = min(states.values(), key=lambda s: s["rows"])
            print(
                f"resuming the bottom-up import at TSV row {state['rows']} (file {state['file']} byte {state['offset']})",
                flush=True,
            )
            return state
        except OSError as exc:
            print(f"cannot resume the bottom-up import ({exc}): starting over", flush=True)
            for f in files.values():
                f.close()
            files.clear()
    for split, out in outputs.items():
        n = len(split_ids[split])
        files[split] = create_partial(out, region_datasets(n, max_boxes, dim, dtype), split_ids[split], attrs)
        files[split].create_dataset("_source_row", data=np.full(n, -1, dtype=np.int64))
        files[split].flush()
    return {"rows": 0, "file": 0, "offset": 0, "line": 0}


def _stream(paths, start, position, source_row, files, outputs, fingerprint, dim, max_boxes, dtype, chunk_rows):
    """Write every wanted TSV line into its split row, committing every `chunk_rows` lines."""
    sizes = [p.stat().st_size for p in paths]
    g = start["rows"]  # global 0-based index of the current line over all files

    def commit_all(i, lineno, offset):
        state = {"fingerprint": fingerprint, "rows": g, "file": i, "offset": offset, "line": lineno}
        for split, f in files.items():
            f["_source_row"][:] = source_row[split]
            commit(f, outputs[split], state)

    last = (start["file"], start["line"], start["offset"])
    with tqdm(
        total=sum(sizes),
        initial=sum(sizes[: start["file"]]) + start["offset"],
        desc="import_bottomup",
        unit="B",
        unit_scale=True,
    ) as bar:
        for i, lineno, line, offset in _lines(paths, start):
            where = f"{paths[i]} row {lineno}"
            fields = _fields(line, where)
            if fields is not None:
                target = position.get(_int(fields, 0, where))
                if target is not None:
                    split, row = target
                    previous = int(source_row[split][row])
                    if 0 <= previous < g:  # a later line of a killed run is not a duplicate: it is this one
                        raise CaptionflowError(
                            f"{where}: image {int(fields[0])} is listed twice in the TSV files "
                            f"(first at row {previous + 1} of all files read in order)"
                        )
                    _, feats, boxes = parse_row(fields, where, dim, max_boxes)
                    write_rows(files[split], row, region_rows([feats], [boxes], max_boxes, dtype, where))
                    source_row[split][row] = g
            g += 1
            bar.update(len(line))
            last = (i, lineno, offset)
            if g % chunk_rows == 0:
                commit_all(*last)
    commit_all(*last)  # a rerun after a missing-images error need not read the TSVs again


def _check_complete(source_row, split_ids, labels_json, paths):
    missing = {s: [split_ids[s][r] for r in np.flatnonzero(rows < 0)] for s, rows in source_row.items()}
    total = sum(len(ids) for ids in missing.values())
    if total:
        first = [i for ids in missing.values() for i in ids][:5]
        counts = ", ".join(f"{s} {len(ids)}" for s, ids in missing.items() if ids)
        raise CaptionflowError(
            f"{total} images of {labels_json} ({counts}) are not in the bottom-up TSV files "
            f"{', '.join(p.name for p in paths)} (first ids: {', '.join(map(str, first))})"
        )
