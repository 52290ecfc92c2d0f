"""Array layout of stored cases: chunks, shards and codecs (measured, see docs/benchmarks.md)."""

from __future__ import annotations

from typing import Any

from zarr.codecs import ZstdCodec

__all__ = ["CHUNK_SLICES", "array_options"]

#: Slices per chunk. Measured on full-size cases (bench/store.py, docs/benchmarks.md): 4-slice
#: chunks without shards gave the most random k=3 reads/s and the fastest whole-case reads.
CHUNK_SLICES = 4
#: zstd level 1 decodes fastest at nearly the ratio of higher levels on CT slices.
ZSTD_LEVEL = 1


def array_options(shape: tuple[int, int, int]) -> dict[str, Any]:
    """``zarr.create_array`` keyword arguments for a (Z, Y, X) case array."""
    _, y, x = shape
    return {
        "chunks": (CHUNK_SLICES, y, x),
        "compressors": ZstdCodec(level=ZSTD_LEVEL),
        "dimension_names": ("z", "y", "x"),
        "fill_value": 0,
    }
