"""Feature store: rows of one split's feature HDF5, read at the pace a GPU consumes them.

A file up to `max_memory_mb` (HOLD_MB by default, counted in the file's own dtype) is held
in memory in that dtype: a float16 file stays float16, never a float32 copy of twice its
size. A larger file streams: each batch reads its sorted, deduplicated rows (an image's
five captions are one row read) straight from the file, so the store holds a few batches
whatever the file's size. Extraction writes every dataset contiguous and uncompressed
(captionflow.utils.h5), so a row is one run of bytes at a known offset and is read with
one `os.preadv` into the batch's buffer, without h5py's per-read selection cost (measured
in bench/bench_store.py); another layout (chunked, compressed, foreign byte order) is read
with h5py's sorted fancy indexing.

Features stay in the file's dtype until the device: `read(rows)` gives the unique rows
raw (in pinned memory when asked, for non_blocking copies to CUDA), `on_device` copies
them and converts to float32 there, `prefetch` runs the reads `depth` batches ahead in
reader threads (preadv and numpy release the GIL) and yields them in order. `get(rows)`
keeps the plain contract: float32 CPU tensors in the order asked; float16 -> float32 is
exact, so the numbers are the same wherever it happens.

Every row is checked once for NaN and inf (its exponent bits): a held file when it is
loaded, a streamed one as its rows are first read. Problems are one line naming the file.
"""

import concurrent.futures
import math
import os
from collections import deque

import h5py
import numpy as np
import torch

from captionflow.errors import CaptionflowError

REEXTRACT = "delete it and rerun snakemake to extract the features again"
RELABEL = "delete it and rerun snakemake to run prepro_labels again"
HOLD_MB = 4096  # a feature file up to this size is held in memory; a larger one streams
FIT_MB = 1024  # float32 bytes of the sample a model's feature norms are fitted on
CHECK_ROWS = 4096  # rows per finiteness check of a held file (bounded extra memory)
CHECK_BYTES = 2**20  # bytes of values per step of a finiteness check (temporaries stay small)
MAX_READ = 64 * 2**20  # bytes per preadv call (Linux reads at most ~2 GiB per call)


def open_h5(path, what, fix):
    """h5py.File(path, "r"), or a one-line error for a missing, truncated or foreign file."""
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise CaptionflowError(f"{what} {path} does not exist; {fix}") from None
    except OSError as exc:  # h5py: "Unable to open file (file signature not found)", "(truncated file: ...)"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptionflowError(
            f"{what} {path} is not a readable HDF5 file (truncated or another format: {reason}); {fix}"
        ) from None


def require_datasets(f, path, what, names, fix):
    missing = [n for n in names if not isinstance(f.get(n), h5py.Dataset)]
    if missing:
        raise CaptionflowError(
            f"{what} {path} has no {', '.join(missing)} dataset: not a captionflow {what} file; {fix}"
        )


def nonfinite_rows(values):
    """(N, ...) array -> (N,) bool: the rows holding NaN or inf.

    For IEEE floats, a value is NaN or inf exactly when its exponent bits are all ones; one
    integer AND and compare is ~3x faster than np.isfinite on float16."""
    values = np.ascontiguousarray(values).reshape(len(values), int(np.prod(values.shape[1:])))
    if values.dtype.kind != "f" or values.dtype.itemsize not in (2, 4, 8):
        return ~np.isfinite(values).all(1)
    info = np.finfo(values.dtype)
    bits = values.view(f"u{values.dtype.itemsize}")
    exponent = np.array(((1 << info.nexp) - 1) << info.nmant, dtype=bits.dtype)
    step = max(1, CHECK_BYTES // max(1, bits[:1].nbytes))  # rows at a time: small temporaries
    return np.concatenate(
        [((bits[b : b + step] & exponent) == exponent).any(1) for b in range(0, len(bits), step)] or [np.zeros(0, bool)]
    )


def _runs(rows):
    """Sorted unique rows -> [(first row, count, position in rows)] of consecutive rows."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(rows)]])
    return [(int(rows[s]), int(e - s), int(s)) for s, e in zip(starts, ends)]


class _Dataset:
    """One (N, ...) dataset of the file, read by rows: preadv at its byte offset when it is
    stored contiguous, uncompressed and in native byte order, else h5py."""

    def __init__(self, store, name):
        self.store, self.name = store, name
        self.h5 = store.file[name]
        self.dtype = self.h5.dtype
        self.row_shape = self.h5.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        offset = self.h5.id.get_offset() if self.h5.chunks is None and len(self.h5) else None
        self.offset = offset if offset is not None and self.dtype.isnative else None
        if self.offset is not None and self.offset + self.h5.nbytes > os.path.getsize(store.path):
            raise CaptionflowError(
                f"features {store.path} end before their {name} rows do (a truncated file); {REEXTRACT}"
            )

    def read_into(self, rows, out):
        """Sorted unique rows (U,) -> out (U, ...), a numpy view of the batch's buffer."""
        if self.offset is None:
            out[...] = self.store._read(lambda: self.h5[rows])
            return
        flat = out.reshape(len(out), -1).view(np.uint8)
        for first, count, at in _runs(rows):
            buf = memoryview(flat[at : at + count]).cast("B")
            done, position = 0, self.offset + first * self.row_bytes
            while done < len(buf):  # preadv may return less than asked
                n = os.preadv(self.store.fd, [buf[done : done + MAX_READ]], position + done)
                if n <= 0:
                    raise CaptionflowError(f"features {self.store.path} cannot be read (rows end early); {REEXTRACT}")
                done += n


class FeatureStore:
    """Rows of one split's feature HDF5, in labels-JSON order.

    get(rows) -> {"att": (N, R, D), "fc": (N, D)} float32 tensors, plus "att_mask" (N, R)
    bool (True = a real region) for region features with a variable box count (bottom-up
    files). blind=True returns zeros of the same shapes (the image-blind baseline).
    max_memory_mb: the largest file held in memory (in its own dtype; None: HOLD_MB); a
    larger one streams.
    """

    def __init__(self, path, expected_ids=None, blind=False, max_memory_mb=None):
        self.path = path
        self.blind = blind
        self.file = open_h5(path, "features", REEXTRACT)
        require_datasets(self.file, path, "features", ("att", "fc", "image_id"), REEXTRACT)
        att, fc = self.file["att"], self.file["fc"]
        ids = self._read(lambda: self.file["image_id"][()])
        if att.ndim != 3 or fc.ndim != 2 or att.shape[2] != fc.shape[1] or not len(att) == len(fc) == len(ids):
            raise CaptionflowError(
                f"features {path} have inconsistent shapes (att {att.shape}, fc {fc.shape}, image_id {ids.shape}; "
                f"expected (N, R, D), (N, D), (N,)); {REEXTRACT}"
            )
        if expected_ids is not None and ids.tolist() != list(expected_ids):
            raise CaptionflowError(
                f"features {path} do not list the labels' images in their order; rerun extract_features"
            )
        self.ids = ids
        self.att_shape = att.shape[1:]
        self.feat_dim = fc.shape[1]
        self.keys = ("att", "fc", "att_mask") if "att_mask" in self.file else ("att", "fc")
        self.dtypes = {k: torch.from_numpy(np.zeros(0, self.file[k].dtype)).dtype for k in self.keys}
        self.memory = None  # {key: (N, ...) tensor in the file's dtype} of a held file
        self.fd = os.open(path, os.O_RDONLY)
        self.datasets = {k: _Dataset(self, k) for k in self.keys}
        self.checked = np.zeros(len(ids), dtype=bool)  # rows already found finite
        if blind:  # the image-blind baseline never reads the values
            self.checked[:] = True
        elif (
            os.path.getsize(path) <= (HOLD_MB if max_memory_mb is None else max_memory_mb) * 2**20
        ):  # as held_mb counts
            self.memory = {k: self._load(k) for k in self.keys}
            self.checked[:] = True

    def _read(self, read):
        """Run an h5py read; a damaged file is one line, not h5py's OSError."""
        try:
            return read()
        except OSError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CaptionflowError(f"features {self.path} cannot be read ({reason}); {REEXTRACT}") from None

    def _load(self, key):
        """The whole dataset `key` as a tensor of its dtype, checked for NaN/inf chunk by chunk."""
        values = torch.from_numpy(self._read(lambda: self.file[key][()]))
        if key != "att_mask":
            bad = [nonfinite_rows(values[b : b + CHECK_ROWS].numpy()) for b in range(0, len(values), CHECK_ROWS)]
            self._check(key, np.concatenate(bad) if bad else np.zeros(0, bool), np.arange(len(values)))
        return values

    def _check(self, key, bad, rows):
        """Refuse rows (U,) of `key` when bad (U,) bool (rows holding NaN or inf) has any."""
        bad = np.flatnonzero(bad)
        if len(bad):
            row = int(rows[bad[0]])
            raise CaptionflowError(
                f"features {self.path}: row {row} (image {int(self.ids[row])}) of {key} holds NaN or inf values "
                f"({len(bad)} such row{'s' if len(bad) > 1 else ''} of {len(rows)} read); training on them gives NaN weights: {REEXTRACT} "
                "(if they come back so, check features.weights)"
            )

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)
            self.fd = None

    def __len__(self):
        return len(self.ids)

    def held_bytes(self):
        """Bytes of feature values the store holds between batches (0 when streaming)."""
        return sum(v.nbytes for v in self.memory.values()) if self.memory is not None else 0

    def read(self, rows, pin=False, buffers=None):
        """rows (N,) -> ({key: (U, ...) tensor in the file's dtype}, inverse (N,) int64): the
        U sorted unique rows, read once each; unique[inverse] puts them back in the order asked.
        pin: into page-locked memory (for non_blocking copies to a CUDA device).
        buffers: a dict to keep the batch buffers in and reuse on the next call given it (no
        fresh pages to fault in per batch); the tensors returned are views of them, valid
        until then. on_device leaves a CUDA event there that this waits for first."""
        uniq, inverse = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
        inverse = torch.from_numpy(inverse.reshape(-1))
        if self.blind:
            zeros = {"att": torch.zeros(len(uniq), *self.att_shape), "fc": torch.zeros(len(uniq), self.feat_dim)}
            return zeros, inverse
        size = len(uniq) if buffers is None else len(inverse)  # kept buffers fit any batch this size
        buffers = {} if buffers is None else buffers
        if buffers.get("copied") is not None:  # the last copy out of these buffers is done
            buffers.pop("copied").synchronize()
        out = {}
        for k in self.keys:
            ds = self.datasets[k]
            buf = buffers.get(k)
            if buf is None or len(buf) < len(uniq) or buf.is_pinned() != pin:
                buf = buffers[k] = torch.empty((size, *ds.row_shape), dtype=self.dtypes[k], pin_memory=pin)
            out[k] = buf[: len(uniq)]
            if self.memory is not None:
                torch.index_select(self.memory[k], 0, torch.from_numpy(uniq), out=out[k])
            else:
                ds.read_into(uniq, out[k].numpy())
        unchecked = ~self.checked[uniq]
        if unchecked.any():  # rows read for the first time
            for k in ("att", "fc"):
                self._check(k, unchecked & nonfinite_rows(out[k].numpy()), uniq)
            self.checked[uniq] = True
        return out, inverse

    def pooled(self):
        """Every row's pooled feature fc (N, D) as float32, without reading the grids
        (retrieval scores whole galleries by them; fc is small even at COCO size)."""
        if self.blind:
            return torch.zeros(len(self), self.feat_dim)
        return (self.memory["fc"] if self.memory is not None else self._load("fc")).float()

    def get(self, rows):
        """rows (N,) -> {key: (N, ...)} float32 (att_mask bool) CPU tensors, in the order asked."""
        return on_device(*self.read(rows), torch.device("cpu"))

    def fit_rows(self, max_rows=5000, max_mb=FIT_MB):
        """How many leading rows a model's feature norms are fitted on: up to max_rows, and no
        more than max_mb of float32 values (Swin-L's 144 x 1536 regions: 1,213 rows, ~175k
        region vectors per dimension, instead of 5,000 rows and 4.4 GB)."""
        row_mb = (np.prod(self.att_shape) + self.feat_dim) * 4 / 2**20
        return max(1, min(len(self), max_rows, int(max_mb / row_mb)))


def held_mb(paths):
    """MB of memory a job holds for these HDF5 inputs (a job's mem_mb adds it, rules/
    common/resources.smk): each file up to HOLD_MB (feature files a FeatureStore holds;
    labels, always read whole, are small); a larger feature file streams in a few batches
    and counts 0. A path that does not exist yet counts 0."""
    sizes = [os.path.getsize(p) for p in map(str, paths) if p.endswith(".h5") and os.path.exists(p)]
    return math.ceil(sum(s for s in sizes if s <= HOLD_MB * 2**20) / 2**20)


def on_device(feats, inverse, device, buffers=None):
    """Raw unique rows {key: (U, ...)} + inverse (N,) -> {key: (N, ...)} on `device`, float
    values as float32: copied in the file's dtype (non_blocking from pinned memory), expanded
    to the rows asked and converted there. buffers: those `feats` were read into; a CUDA
    event recorded after the copies tells their next read when it may overwrite them."""
    non_blocking = device.type == "cuda"
    index = inverse.to(device, non_blocking=non_blocking)
    out = {}
    for k, v in feats.items():
        v = v.to(device, non_blocking=non_blocking).index_select(0, index)
        out[k] = v.float() if v.is_floating_point() else v
    if non_blocking and buffers is not None:
        buffers["copied"] = torch.cuda.Event()
        buffers["copied"].record()
    return out


def prefetch(make, items, depth=4, workers=2):
    """Yield make(item, slot) for each of `items` in order, computed up to `depth` items
    ahead by `workers` threads. slot: a dict make may keep buffers in, handed back every
    depth + 1 items, once the consumer has moved past the item that last used it.

    Two threads by default: one leaves the reads idle while it hands a batch over (~0.2 ms
    a batch, bench/bench_store.py); two keep a read under way.
    Items are drawn on the caller's thread (a generator of batches stays single-threaded);
    an exception of make is raised where its item would be yielded. make must not use
    random state: prefetching then changes no result, only when reads happen."""
    items = iter(items)
    slots = [{} for _ in range(depth + 1)]
    pending = deque()
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="feature-reader") as pool:
        try:
            for i, item in enumerate(items):
                pending.append(pool.submit(make, item, slots[i % len(slots)]))
                if len(pending) >= depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # the consumer stopped early (an exception, preemption): drop what is queued
            for future in pending:
                future.cancel()
