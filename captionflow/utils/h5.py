"""The one resumable HDF5 writer: rows go into `<out>.partial`, progress into `<out>.partial.json`.

Snakemake deletes a failed job's outputs, so a long writer (feature extraction, the
bottom-up import) fills `<out>.partial` instead, whose datasets are allocated in full when
it is created: contiguous row-major storage allocated early, so each row is one run on
disk and later writes touch raw data only, never metadata (a killed writer leaves the file
readable). After each chunk of rows the writer calls `commit`: the file is flushed, then
the progress record (the run's fingerprint plus what the writer needs to continue, such
as rows done or a TSV offset) is written atomically. A rerun with the same fingerprint
reopens the partial file and continues from the record; anything else starts over.
`finish` drops the hidden datasets (names starting with "_"), closes the file and renames
it onto `<out>`.
"""

import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np

from captionflow.utils.io import require_free_space, write_json


def partial_paths(out):
    """(`<out>.partial`, `<out>.partial.json`) of a run writing `out`."""
    out = Path(out)
    return out.with_name(out.name + ".partial"), out.with_name(out.name + ".partial.json")


def ids_digest(ids):
    """SHA-256 of image ids (N,), for a fingerprint: other images or another order start over."""
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


def saved_state(out, fingerprint):
    """The progress record of an interrupted run of `out` with this fingerprint, or None."""
    partial, progress = partial_paths(out)
    if not (partial.exists() and progress.exists()):
        return None
    try:
        state = json.loads(progress.read_text())
    except (OSError, ValueError) as exc:
        print(f"cannot resume from {partial} ({exc}): starting over", flush=True)
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        print(f"settings changed since the interrupted run of {Path(out).name}: starting over", flush=True)
        return None
    return state


def create_partial(out, datasets, ids, attrs):
    """A new `<out>.partial` with `datasets` ({name: (shape, dtype)}) allocated now, plus
    `image_id` (N,) int64 and `attrs`; an old progress record is removed. Space for all of
    it is checked first: a full disk is one line before anything is written."""
    partial, progress = partial_paths(out)
    progress.unlink(missing_ok=True)
    needed = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in datasets.values())
    existing = partial.stat().st_size if partial.exists() else 0  # a file being replaced
    require_free_space(partial, needed + 8 * len(ids) + 2**16 - existing)
    f = h5py.File(partial, "w")
    for name, (shape, dtype) in datasets.items():
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        f.create_dataset(name, shape=shape, dtype=dtype, dcpl=dcpl)
    f.create_dataset("image_id", data=np.asarray(ids, dtype=np.int64))
    f.attrs.update(attrs)
    f.flush()
    return f


def open_partial(out, fingerprint, datasets, ids, attrs):
    """-> (open file, saved progress record or None): `<out>.partial` reopened when its
    record has this fingerprint, else created afresh (see `create_partial`)."""
    state = saved_state(out, fingerprint)
    if state is not None:
        try:
            return h5py.File(partial_paths(out)[0], "r+"), state
        except OSError as exc:
            print(f"cannot resume from {partial_paths(out)[0]} ({exc}): starting over", flush=True)
    return create_partial(out, datasets, ids, attrs), None


def write_rows(f, start, rows):
    """Write rows ({name: (B, ...) array}) into rows start..start+B of the open file `f`."""
    for name, value in rows.items():
        f[name][start : start + len(value)] = value


def commit(f, out, state):
    """Flush `f`, then record `state` (with its "fingerprint") as where a rerun continues."""
    f.flush()  # data on disk before the progress record claims it
    write_json(partial_paths(out)[1], state)


def finish(f, out):
    """Drop the hidden datasets of the complete partial file, close it, rename it onto `out`."""
    for name in [name for name in f if name.startswith("_")]:
        del f[name]
    f.close()
    partial, progress = partial_paths(out)
    os.replace(partial, out)
    progress.unlink()
