"""Fast 2.5D reads: k adjacent slices around z, with edge replication.

Reads go by whole chunks (``CHUNK_SLICES`` slices of image and label): zarr-python costs
about 1 ms per call, so a sample's chunks are read in one call, never slice by slice.
Decoded chunks stay in a least-recently-used cache bounded in bytes, so the samples of a
batch (and of later batches) that share a chunk decode it once. The cache is per
reader, and a reader is shared by the threads of one training process.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np

from storage.layout import CHUNK_SLICES

if TYPE_CHECKING:
    from storage.store import SliceStore, StoredCase

__all__ = ["CaseReader", "ChunkCache", "window_indices"]


def window_indices(z: int, k: int, depth: int) -> np.ndarray:
    """Slice indices of a k-slice window centred on ``z``, clipped to [0, depth)."""
    if k < 1 or k % 2 == 0:
        raise ValueError(f"k must be a positive odd number of slices, got {k}")
    return np.clip(np.arange(z - k // 2, z + k // 2 + 1), 0, depth - 1)


class ChunkCache:
    """Decoded (image, label) chunks keyed by (case, chunk index); LRU, bounded in bytes.

    Thread-safe. ``max_bytes`` 0 keeps nothing (every read decodes)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._items: OrderedDict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> tuple[np.ndarray, np.ndarray] | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: tuple[str, int], item: tuple[np.ndarray, np.ndarray]) -> None:
        size = item[0].nbytes + item[1].nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = item
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (image, label) = self._items.popitem(last=False)
                self.bytes -= image.nbytes + label.nbytes


class CaseReader:
    """Reads 2.5D samples from a store; keeps each case's arrays open and caches decoded
    chunks (``cache_bytes``, default 0: none)."""

    def __init__(self, store: SliceStore, k: int = 3, cache_bytes: int = 0) -> None:
        self.store = store
        self.k = k
        self.cache = ChunkCache(cache_bytes)
        self._cases: dict[str, StoredCase] = {}

    def _case(self, case_id: str) -> StoredCase:
        if case_id not in self._cases:
            self._cases[case_id] = self.store.case(case_id)
        return self._cases[case_id]

    def sample(self, case_id: str, z: int) -> tuple[np.ndarray, np.ndarray]:
        """Image (k, Y, X) in the stored dtype and the label (Y, X) of slice ``z``."""
        case = self._case(case_id)
        depth = case.meta.shape[0]
        if not 0 <= z < depth:
            raise IndexError(f"slice {z} is outside case {case_id!r} with {depth} slices")
        idx = window_indices(z, self.k, depth)
        first, last = int(idx[0]) // CHUNK_SLICES, int(idx[-1]) // CHUNK_SLICES
        chunks = self._chunks(case_id, case, first, last + 1)
        images = chunks[0][0] if len(chunks) == 1 else np.concatenate([c[0] for c in chunks])
        start = first * CHUNK_SLICES
        label = chunks[(z - start) // CHUNK_SLICES][1][(z - start) % CHUNK_SLICES]
        return images[idx - start], label.copy()

    def _chunks(
        self, case_id: str, case: StoredCase, first: int, stop: int
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Chunks ``first:stop`` of a case: cached ones from the cache, the missing run
        read in one call per array."""
        found = [self.cache.get((case_id, c)) for c in range(first, stop)]
        missing = [c for c, item in zip(range(first, stop), found, strict=True) if item is None]
        if missing:
            lo, hi = missing[0] * CHUNK_SLICES, (missing[-1] + 1) * CHUNK_SLICES
            image, label = np.asarray(case.image[lo:hi]), np.asarray(case.label[lo:hi])
            for c in missing:
                a, b = (c * CHUNK_SLICES - lo), (c + 1) * CHUNK_SLICES - lo
                item = (image[a:b].copy(), label[a:b].copy())  # no shared base buffer
                self.cache.put((case_id, c), item)
                found[c - first] = item
        return [item for item in found if item is not None]
