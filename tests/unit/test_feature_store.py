"""The feature store (captionflow.data.store): batches equal direct h5py reads, memory stays
bounded on a file larger than its limit, prefetching changes nothing but when reads happen."""

import ctypes
import math
import random
import time

import h5py
import numpy as np
import pytest
import torch

from captionflow.data import store as store_module
from captionflow.data.captions import SplitData
from captionflow.data.store import FeatureStore, held_mb, nonfinite_rows, prefetch
from captionflow.training.sampler import bucketed_batches
from captionflow.utils.h5 import commit, create_partial, finish, write_rows


def _extracted(path, n, regions, dim, dtype, seed=0):
    """A feature file in the layout extraction writes (captionflow.utils.h5), random rows."""
    rng = np.random.default_rng(seed)
    datasets = {"att": ((n, regions, dim), dtype), "fc": ((n, dim), dtype)}
    f = create_partial(path, datasets, np.arange(100, 100 + n), {"dtype": np.dtype(dtype).name})
    for b in range(0, n, 256):
        m = min(256, n - b)
        write_rows(
            f,
            b,
            {
                "att": rng.standard_normal((m, regions, dim), dtype=np.float32).astype(dtype),
                "fc": rng.standard_normal((m, dim), dtype=np.float32).astype(dtype),
            },
        )
    commit(f, path, {"fingerprint": "test", "rows_done": n})
    finish(f, path)
    return path


def _chunked(path, source):
    """The same rows in a layout extraction never wrote (chunked, gzip): read through h5py."""
    with h5py.File(source, "r") as src, h5py.File(path, "w") as dst:
        for k in src:
            dst.create_dataset(
                k, data=src[k][()], chunks=(4, *src[k].shape[1:]) if k != "image_id" else None, compression="gzip"
            )
    return path


def _shuffled_batches(n, batch, captions=5, seed=0):
    """Batches as XE builds them: items are captions, so each image's row comes up to 5 times."""
    rng = np.random.default_rng(seed)
    items = rng.permutation(np.repeat(np.arange(n), captions))
    return [items[b : b + batch] for b in range(0, len(items), batch)]


@pytest.mark.parametrize("layout", ["extracted", "chunked"])
@pytest.mark.parametrize("held", [True, False])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_batches_equal_direct_h5py_reads_for_shuffled_rows(tmp_path, dtype, held, layout):
    path = _extracted(tmp_path / "f.h5", 37, 6, 8, dtype)
    if layout == "chunked":
        path = _chunked(tmp_path / "chunked.h5", path)
    store = FeatureStore(path, max_memory_mb=1024 if held else 0)
    assert (store.memory is not None) == held
    # the direct preadv path serves the extraction layout; other layouts go through h5py
    assert (store.datasets["att"].offset is not None) == (layout == "extracted")
    with h5py.File(path, "r") as f:
        for rows in _shuffled_batches(37, 13):
            got = store.get(rows)
            raw, inverse = store.read(rows)
            for k in ("att", "fc"):
                direct = np.stack([f[k][int(r)] for r in rows])  # one plain h5py read per row
                assert got[k].dtype == torch.float32 and got[k].shape == direct.shape
                assert np.array_equal(got[k].numpy(), direct.astype(np.float32))
                # kept in the file's dtype until the device, each image's row read once
                assert raw[k].numpy().dtype == dtype and len(raw[k]) == len(set(rows.tolist()))
                assert np.array_equal(raw[k][inverse].numpy(), direct)


def test_memory_stays_bounded_on_a_file_larger_than_the_limit(tmp_path):
    """A 216 MB float16 file, a 16 MB limit: every row read in shuffled batches through the
    prefetching reader, and the process grows by less than 48 MB. Control: held, the same
    file takes its size in float16 (not a float32 copy), and the measurement sees it."""
    n, regions, dim = 3000, 144, 256  # 72 KB a row
    path = _extracted(tmp_path / "big.h5", n, regions, dim, np.float16)
    file_mb = path.stat().st_size / 2**20
    assert file_mb > 200

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    def baseline_rss_mb():
        # freed memory that malloc keeps resident (earlier tests of this process) would be
        # reused without growing the RSS: hand it back to the system first
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return rss_mb()

    store = FeatureStore(path, max_memory_mb=16)
    assert store.held_bytes() == 0
    base, peak, rows_read = baseline_rss_mb(), 0.0, 0
    for raw, _inverse in prefetch(lambda rows, slot: store.read(rows, buffers=slot), _shuffled_batches(n, 50)):
        rows_read += len(raw["att"])
        peak = max(peak, rss_mb() - base)
    assert store.checked.all() and rows_read >= n  # every row was read (and checked)
    assert peak < 48, f"streaming a {file_mb:.0f} MB file grew the process by {peak:.0f} MB"
    # the feature-norm fit sample is bounded too
    assert store.fit_rows(max_mb=8) == int(8 * 2**20 / ((regions + 1) * dim * 4))

    before = baseline_rss_mb()
    held = FeatureStore(path, max_memory_mb=1024)
    assert held.held_bytes() == n * (regions + 1) * dim * 2  # float16, no float32 copy
    assert rss_mb() - before > 0.5 * held.held_bytes() / 2**20  # the RSS measurement sees it


def test_prefetch_yields_in_order_and_raises_where_the_item_fails():
    def slow(i, slot):
        time.sleep(random.random() * 0.01)  # workers finish out of order
        if i == 7:
            raise ValueError("item 7")
        return i * i

    got = []
    with pytest.raises(ValueError, match="item 7"):
        for value in prefetch(slow, range(12), depth=4, workers=3):
            got.append(value)
    assert got == [i * i for i in range(7)]
    assert list(prefetch(slow, range(5), depth=3, workers=2)) == [0, 1, 4, 9, 16]


@pytest.mark.parametrize("hold_mb", [4096, 0])
def test_prefetched_caption_batches_equal_the_plain_path(tiny_data, monkeypatch, hold_mb):
    monkeypatch.setattr(store_module, "HOLD_MB", hold_mb)  # held or streamed
    data = SplitData(tiny_data / "labels.h5", tiny_data / "labels.json", tiny_data / "train.h5", "train")
    assert (data.features.memory is None) == (hold_mb == 0)
    batches = bucketed_batches(data.lengths, 8, seed=3, epoch=1)
    state = torch.get_rng_state()
    prefetched = list(data.caption_batches(iter(batches), torch.device("cpu")))
    assert torch.equal(torch.get_rng_state(), state)  # no random state consumed
    assert len(prefetched) == len(batches)
    for items, got in zip(batches, prefetched):
        want = data.caption_batch(items)
        assert got[0].keys() == want[0].keys()
        assert all(torch.equal(got[0][k], want[0][k]) for k in want[0])
        assert all(torch.equal(g, w) for g, w in zip(got[1:], want[1:]))


def test_extraction_writes_rows_the_store_reads_directly(tiny_data):
    with h5py.File(tiny_data / "train.h5", "r") as f:
        for k in ("att", "fc"):
            assert f[k].chunks is None and f[k].compression is None  # contiguous rows
    store = FeatureStore(tiny_data / "train.h5", max_memory_mb=0)
    assert all(store.datasets[k].offset is not None for k in ("att", "fc"))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_nonfinite_rows_matches_isfinite(dtype):
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((64, 3, 5)) * 100).astype(dtype)
    values[3, 1, 2], values[10, 0, 0], values[20, 2, 4] = np.nan, np.inf, -np.inf
    values[30, 0, 1] = np.finfo(dtype).max  # the largest finite value is finite
    values[40, 1, 1] = np.finfo(dtype).tiny / 4  # so is a subnormal
    want = ~np.isfinite(values).reshape(64, -1).all(1)
    assert want.sum() == 3 and np.array_equal(nonfinite_rows(values), want)


def test_held_mb_counts_what_the_store_holds(tmp_path, monkeypatch):
    """The rules add held_mb(inputs) to a job's mem_mb: it must count exactly the files a
    FeatureStore holds (up to HOLD_MB), not the ones it streams, nor files not yet written."""
    small = _extracted(tmp_path / "small.h5", 40, 6, 8, np.float16)
    large = _extracted(tmp_path / "large.h5", 400, 64, 64, np.float16)  # ~3.2 MB
    monkeypatch.setattr(store_module, "HOLD_MB", 1)
    assert FeatureStore(small).memory is not None and FeatureStore(large).memory is None
    assert held_mb([small, large, tmp_path / "missing.h5", tmp_path / "labels.json"]) == 1  # small, rounded up
    monkeypatch.setattr(store_module, "HOLD_MB", 8)
    assert FeatureStore(large).memory is not None
    assert held_mb([small, large]) == math.ceil((small.stat().st_size + large.stat().st_size) / 2**20)
