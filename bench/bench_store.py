"""Benchmark the feature store: images/s of shuffled batches against raw h5py and a memory map.

    python bench/bench_store.py [--images 25000] [--regions 144] [--dim 1536] [--batches 200] [--keep]

Writes a float16 feature file in the layout extraction writes (captionflow.utils.h5:
contiguous, uncompressed; 25,000 x 144 x 1536 is 11 GB), then reads the same shuffled
batches of 50 images (att and fc rows) five ways in one run: plain h5py reads of the
sorted rows (what h5py needs), np.memmap of the raw datasets at their offsets, the store's
`read` on the training thread, and the store through its prefetching reader (1 and 2
threads). Warm: the rows in the page cache; cold: the file dropped from it before each
way (posix_fadvise DONTNEED; the host may still cache under a VM). Warm figures are each
way's second pass over the batches (the memory map's pages then mapped, the store's rows
then checked for NaN/inf, as from a training run's second epoch). Prints images/s, the
ratios to h5py and memmap, and the process's peak RSS. The file is deleted unless --keep.
"""

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from captionflow.data.store import FeatureStore, prefetch
from captionflow.utils.h5 import commit, create_partial, finish, write_rows


def write_features(path, n, regions, dim, block=256):
    """n rows of float16 features: a block of random rows written over and over (varied)."""
    rng = np.random.default_rng(0)
    att = rng.standard_normal((block, regions, dim), dtype=np.float32).astype(np.float16)
    fc = att.mean(axis=1)
    f = create_partial(
        path, {"att": ((n, regions, dim), np.float16), "fc": ((n, dim), np.float16)}, np.arange(n), {"dtype": "float16"}
    )
    for b in range(0, n, block):
        m = min(block, n - b)
        write_rows(f, b, {"att": np.roll(att, b // block, axis=0)[:m], "fc": fc[:m]})
    commit(f, path, {"fingerprint": "bench", "rows_done": n})
    finish(f, path)


def drop_cache(path):
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=25000)
    parser.add_argument("--regions", type=int, default=144)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--batches", type=int, default=200, help="batches per way and cache state")
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--keep", action="store_true", help="keep the feature file")
    args = parser.parse_args()
    path = Path(args.dir) / f"bench_store_{args.images}x{args.regions}x{args.dim}.h5"
    if not path.exists():
        t = time.perf_counter()
        write_features(path, args.images, args.regions, args.dim)
        print(f"wrote {path} in {time.perf_counter() - t:.0f} s", flush=True)
    gb = path.stat().st_size / 1e9
    print(
        f"{path.name}: {args.images} x {args.regions} x {args.dim} float16 ({gb:.1f} GB), shuffled batches of {args.batch_size} images"
    )
    try:
        run(path, args)
    finally:
        if not args.keep:
            path.unlink()


def run(path, args):
    rng = np.random.default_rng(1)
    perm = rng.permutation(args.images)[: args.batches * args.batch_size]
    batches = [np.sort(perm[b : b + args.batch_size]) for b in range(0, len(perm), args.batch_size)]
    f = h5py.File(path, "r")
    maps = {
        k: np.memmap(path, dtype=f[k].dtype, mode="r", offset=f[k].id.get_offset(), shape=f[k].shape)
        for k in ("att", "fc")
    }
    store = FeatureStore(path, max_memory_mb=0)  # streams: the file is far above any limit
    store_rss = {}
    print(f"RSS after imports and opening: {rss_mb():.0f} MB")

    def h5py_reads():
        for rows in batches:
            f["att"][rows], f["fc"][rows]

    def memmap_reads():
        for rows in batches:
            np.array(maps["att"][rows]), np.array(maps["fc"][rows])

    def store_reads():
        slot = {}
        for rows in batches:
            store.read(rows, buffers=slot)

    def store_prefetch(workers):
        def fn():
            base = rss_mb()
            peak = 0.0
            for _ in prefetch(lambda rows, slot: store.read(rows, buffers=slot), batches, depth=4, workers=workers):
                peak = max(peak, rss_mb() - base)
            store_rss[workers] = peak

        return fn

    ways = {  # the memory map last: its pages count in RSS while mapped
        "store.read": store_reads,
        "store prefetch, 1 thread": store_prefetch(1),
        "store prefetch, 2 threads": store_prefetch(2),
        "h5py (sorted fancy index)": h5py_reads,
        "np.memmap": memmap_reads,
    }
    peak_before_memmap = 0.0
    images = len(batches) * args.batch_size
    for state in ("warm", "cold"):
        print(f"\n{state} ({images} images, {images * store.datasets['att'].row_bytes / 1e9:.1f} GB of att per way):")
        rate = {}
        for name, fn in ways.items():
            if name == "np.memmap" and not peak_before_memmap:
                peak_before_memmap = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            if state == "cold":
                drop_cache(path)
            else:  # a first pass: rows in the page cache (mapped, for the memory map; checked, for the store)
                fn()
            t = time.perf_counter()
            fn()
            rate[name] = images / (time.perf_counter() - t)
            print(f"  {name:27s} {rate[name]:9.0f} img/s", flush=True)
        for name in [n for n in ways if n.startswith("store")]:
            print(
                f"  {name:27s} {rate[name] / rate['h5py (sorted fancy index)']:5.2f}x h5py, {rate[name] / rate['np.memmap']:5.2f}x memmap"
            )
    print(
        f"\nRSS growth while streaming with prefetch: {store_rss[1]:.0f} MB (1 thread), {store_rss[2]:.0f} MB (2 threads)"
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"peak RSS of the process: {peak_before_memmap:.0f} MB before the memory map was read (writing the file: its 256-row blocks), {peak:.0f} MB after (mapped pages count)"
    )


if __name__ == "__main__":
    main()
