"""User-facing errors: one line that says what is wrong and where."""

import contextlib
import errno
import os
import re
import shutil
import sys


class CaptionflowError(Exception):
    """A problem with the user's inputs or configuration (not a bug in captionflow).

    The message is a single line naming the offending file/record/key and the reason.
    """


def _mb(n):
    return f"{n / 2**20:.1f} MB"


class DiskFullError(CaptionflowError):
    """No space left on the filesystem an output is written to: a machine fault, said in
    one line with the free space and what the write needed, instead of a library's
    traceback (h5py's OSError, torch's `basic_ios::clear: iostream error`)."""

    def __init__(self, path, needed=None, planned=False):
        path = os.path.abspath(path)
        folder = os.path.dirname(path)
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        usage = shutil.disk_usage(folder)
        where = f"({_mb(usage.free)} free of {_mb(usage.total)} on the filesystem of {folder})"
        if planned:  # refused before writing anything
            message = f"disk full: not enough space to write {path} {where}; free {_mb(needed)} more there and rerun"
        else:
            what = f"more than {_mb(needed)}" if needed else "more space"
            message = f"disk full: no space left writing {path} {where}; free {what} there and rerun: the stage resumes from what it had saved"
        super().__init__(message)


def _no_space(exc):
    """The ENOSPC OSError in an exception's chain, or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _hdf5_shortfall(path):
    """Bytes an HDF5 file still lacks to hold all its datasets, when it can be read."""
    try:
        import h5py

        with h5py.File(path, "r") as f:
            total = sum(d.nbytes for d in f.values() if isinstance(d, h5py.Dataset))
        return max(0, total - os.path.getsize(path)) or None
    except Exception:  # a file cut off mid-write may not open: then it is unknown
        return None


def disk_full_error(exc):
    """The DiskFullError for an exception caused by a full disk, else None."""
    if isinstance(exc, DiskFullError):
        return exc
    cause = _no_space(exc)
    if cause is None:
        return None
    # h5py names the file only inside its message ("filename = 'x.h5', ...")
    named = re.search(r"filename = '([^']+)'", str(cause))
    path = cause.filename or (named and named.group(1)) or os.getcwd()
    return DiskFullError(path, _hdf5_shortfall(path) if str(path).endswith((".h5", ".partial")) else None)


@contextlib.contextmanager
def one_line_errors():
    """Turn a CaptionflowError into one `error: ...` line on stderr and exit status 1.

    Workflow scripts wrap their library call in this, so a rule's log ends with a line a
    user can act on instead of a traceback. A full disk (ENOSPC anywhere) is said the same
    way, also on the console: the log itself may be on the full disk. Any other exception
    is a bug and keeps its traceback.
    """
    try:
        yield
    except Exception as exc:
        error = exc if isinstance(exc, CaptionflowError) else disk_full_error(exc)
        if error is None:
            raise
        line = f"error: {error}"
        streams = [sys.stderr] + (
            [sys.__stderr__] if isinstance(error, DiskFullError) and sys.__stderr__ is not sys.stderr else []
        )
        for stream in streams:
            with contextlib.suppress(OSError):
                print(line, file=stream, flush=True)
        if isinstance(error, DiskFullError):
            # end now: tearing down HDF5 objects whose writes failed can crash the interpreter
            os._exit(1)
        raise SystemExit(1) from None
