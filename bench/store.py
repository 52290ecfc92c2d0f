"""Measure Zarr layouts for the slice store: random 2.5D reads (k adjacent slices).

Takes stored cases from a real store (preprocessed full-size phantoms), rewrites their
image arrays in each candidate layout, then measures on one thread: random k=3 window
reads per second, whole-case read time, bytes on disk, files per case, write time.

Usage: python bench/store.py STORE [--samples 600]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from storage import SliceStore, window_indices

LAYOUTS = {
    "1-slice chunks, 16-slice shards, zstd 1": {
        "chunk": 1,
        "shard": 16,
        "codec": ZstdCodec(level=1),
    },
    "1-slice chunks, no shards, zstd 1": {"chunk": 1, "shard": None, "codec": ZstdCodec(level=1)},
    "1-slice chunks, 16-slice shards, zstd 5": {
        "chunk": 1,
        "shard": 16,
        "codec": ZstdCodec(level=5),
    },
    "1-slice chunks, 16-slice shards, blosc lz4": {
        "chunk": 1,
        "shard": 16,
        "codec": BloscCodec(cname="lz4", clevel=5),
    },
    "1-slice chunks, 16-slice shards, uncompressed": {"chunk": 1, "shard": 16, "codec": None},
    "4-slice chunks, no shards, zstd 1 (chosen)": {
        "chunk": 4,
        "shard": None,
        "codec": ZstdCodec(level=1),
    },
    "whole-case chunk, zstd 1": {"chunk": 0, "shard": None, "codec": ZstdCodec(level=1)},
}


def _write(root: Path, images: dict[str, np.ndarray], layout: dict) -> float:
    start = time.perf_counter()
    for case_id, image in images.items():
        z, y, x = image.shape
        chunk = (layout["chunk"] or z, y, x)
        shards = (layout["shard"], y, x) if layout["shard"] else None
        zarr.create_array(
            str(root / case_id),
            data=image,
            chunks=chunk,
            shards=shards,
            compressors=layout["codec"] if layout["codec"] else None,
        )
    return time.perf_counter() - start


def _measure(
    root: Path, images: dict[str, np.ndarray], samples: int, k: int = 3
) -> tuple[float, float]:
    arrays = {cid: zarr.open_array(str(root / cid), mode="r") for cid in images}
    rng = np.random.default_rng(0)
    ids = list(images)
    start = time.perf_counter()
    for _ in range(samples):
        cid = ids[int(rng.integers(len(ids)))]
        depth = images[cid].shape[0]
        idx = window_indices(int(rng.integers(depth)), k, depth)
        block = np.asarray(arrays[cid][int(idx[0]) : int(idx[-1]) + 1])
        assert block.shape[0] == idx[-1] - idx[0] + 1
    per_second = samples / (time.perf_counter() - start)
    start = time.perf_counter()
    for cid in ids:
        np.asarray(arrays[cid][:])
    whole = (time.perf_counter() - start) / len(ids)
    return per_second, whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("store", type=Path)
    parser.add_argument("--samples", type=int, default=600)
    args = parser.parse_args()
    store = SliceStore.open(args.store)
    images = {cid: store.case(cid).load()[0] for cid in store.cases()}
    shapes = ", ".join("x".join(map(str, im.shape)) for im in images.values())
    print(
        f"{len(images)} cases ({shapes}), dtype {next(iter(images.values())).dtype}, k=3, one thread"
    )
    print("| layout | k=3 reads/s | whole case read | MB on disk | files/case | write s/case |")
    print("|---|---|---|---|---|---|")
    for name, layout in LAYOUTS.items():
        root = Path(tempfile.mkdtemp(prefix="lp-layout-"))
        try:
            write_s = _write(root, images, layout) / len(images)
            rate, whole = _measure(root, images, args.samples)
            files = [p for p in root.rglob("*") if p.is_file()]
            mb = sum(p.stat().st_size for p in files) / 1e6
            print(
                f"| {name} | {rate:.0f} | {whole * 1e3:.0f} ms | {mb:.1f} | {len(files) / len(images):.0f} | {write_s:.2f} |"
            )
        finally:
            shutil.rmtree(root)


if __name__ == "__main__":
    main()
