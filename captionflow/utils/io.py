"""Atomic file writes: an output either exists complete or not at all."""

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

from captionflow.errors import DiskFullError, disk_full_error


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds.

    The temporary name is fixed per target (`.<name>.tmp`), so a write killed mid-way
    (SIGKILL) leaves one file, which no rule declares (no rerun trusts it) and which the
    next write of the same target removes first. A write that fails because the disk is
    full raises DiskFullError (one line: the path, free space, what the write needed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # left by a killed write: free its space before writing
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as exc:
        full = _disk_full(exc, tmp)
        if full is None:
            raise
        raise full from None
    finally:
        if tmp.exists():
            tmp.unlink()


def require_free_space(path, needed):
    """Refuse, before writing, an output of `needed` bytes that the disk under `path`
    cannot hold: one line now instead of a full disk half-way (HDF5 libraries fail
    there with errors that are neither one line nor always catchable)."""
    folder = Path(path).parent
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DiskFullError(path, needed - free, planned=True)


def _disk_full(exc, tmp):
    """DiskFullError when `exc` came from a full disk: ENOSPC, or a writer that hides the
    errno (torch.save: "unexpected pos", "iostream error") on a filesystem with < 1 MiB free."""
    full = disk_full_error(exc)
    written = tmp.stat().st_size if tmp.exists() else 0
    if full is None and shutil.disk_usage(tmp.parent).free < 2**20:
        full = DiskFullError(tmp.with_name(tmp.name[1:-4]), written)
    elif full is not None and written:
        full = DiskFullError(tmp.with_name(tmp.name[1:-4]), written)
    return full


def write_json(path, obj, **dump_kwargs):
    """Write `obj` as JSON to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, **dump_kwargs)
            f.write("\n")


def write_text(path, text):
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def file_sha256(path):
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_stamp(path):
    """Identity of an input file for fingerprints: absolute path, size and mtime (ns), so a
    regenerated or replaced file does not resume what was computed from the old one."""
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"
