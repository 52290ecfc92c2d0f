"""Fast 2.5D reads: k adjacent slices around z, with edge replication.

Each sample is one contiguous read of ``arr[z0:z1]`` (zarr-python costs about 1 ms per
call, so never slice by slice), then edge slices are repeated by index.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import zarr

    from storage.store import SliceStore, StoredCase

__all__ = ["CaseReader", "window_indices"]


def window_indices(z: int, k: int, depth: int) -> np.ndarray:
    """Slice indices of a k-slice window centred on ``z``, clipped to [0, depth)."""
    if k < 1 or k % 2 == 0:
        raise ValueError(f"k must be a positive odd number of slices, got {k}")
    return np.clip(np.arange(z - k // 2, z + k // 2 + 1), 0, depth - 1)


class CaseReader:
    """Reads 2.5D samples from a store; keeps each case's arrays open."""

    def __init__(self, store: SliceStore, k: int = 3) -> None:
        self.store = store
        self.k = k
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
        block = _read_rows(case.image, int(idx[0]), int(idx[-1]) + 1)
        label = np.asarray(case.label[z])
        return block[idx - idx[0]], label


def _read_rows(array: zarr.Array[Any], start: int, stop: int) -> np.ndarray:
    return np.asarray(array[start:stop])
