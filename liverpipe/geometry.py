"""Canonical (Z, Y, X) geometry and its exact inverse.

Convention (see ``docs/geometry.md``): a canonical array ``c[z, y, x]`` has its voxel
axes as close to RAS+ as the scan allows: ``x`` grows towards the patient's Right, ``y``
towards Anterior, ``z`` towards Superior. Its affine maps the column vector
``(x, y, z, 1)`` of indices to RAS+ millimetres. Getting there from a file only permutes
and flips axes, so no voxel is interpolated and the inverse is exact, oblique scans
included (the obliquity stays in the affine).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel.orientations import aff2axcodes, apply_orientation, inv_ornt_aff, io_orientation

__all__ = [
    "SPATIAL_DIMS",
    "CanonicalGeometry",
    "axis_codes",
    "from_canonical",
    "orientation",
    "to_canonical",
    "voxel_spacing",
    "world_of_indices",
]


#: Axes of a volume in space (a NIfTI may add a 4th of length 1).
SPATIAL_DIMS = 3


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size (mm) along each index axis of an affine: the lengths of its first three
    columns. Right for oblique grids too, where summing absolute entries is not."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def orientation(affine: np.ndarray) -> np.ndarray:
    """nibabel's orientation array of an affine: ``[i] = (body axis, flip)`` of voxel axis
    ``i``; NaN rows when two voxel axes point along one body axis (a degenerate affine)."""
    return io_orientation(np.asarray(affine, dtype=np.float64))


def axis_codes(affine: np.ndarray) -> str:
    """The body direction each voxel axis points to most nearly, e.g. ``"RAS"``, ``"LPS"``."""
    return "".join(str(c) for c in aff2axcodes(np.asarray(affine, dtype=np.float64)))


@dataclass(frozen=True, eq=False)
class CanonicalGeometry:
    """How a file's grid relates to its canonical grid.

    ``ornt[i] = (axis, flip)``: file axis ``i`` becomes RAS axis ``axis``, reversed when
    ``flip == -1`` (nibabel's orientation array).
    """

    original_shape: tuple[int, int, int]
    original_affine: np.ndarray
    ornt: np.ndarray

    @classmethod
    def of(cls, shape: tuple[int, int, int], affine: np.ndarray) -> CanonicalGeometry:
        ornt = orientation(affine)
        return cls(tuple(int(s) for s in shape[:3]), np.array(affine, dtype=np.float64), ornt)  # type: ignore[arg-type]

    @property
    def canonical_affine(self) -> np.ndarray:
        """4x4 affine mapping (x, y, z, 1) indices of ``c[z, y, x]`` to RAS+ mm."""
        return self.original_affine @ inv_ornt_aff(self.ornt, self.original_shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(x, y, z) voxel size in mm of the canonical grid."""
        return tuple(float(s) for s in voxel_spacing(self.canonical_affine))  # type: ignore[return-value]

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        """(Z, Y, X) shape of the canonical array."""
        ras = [0, 0, 0]
        for file_axis, (ras_axis, _) in enumerate(self.ornt):
            ras[int(ras_axis)] = self.original_shape[file_axis]
        return (ras[2], ras[1], ras[0])


def to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, CanonicalGeometry]:
    """Reorient a file-order (i, j, k) volume to a C-contiguous (Z, Y, X) array.

    Returns the array and its :class:`CanonicalGeometry`; ``geometry.canonical_affine``
    maps (x, y, z) indices of ``array[z, y, x]`` to RAS+ millimetres.
    """
    geometry = CanonicalGeometry.of(data.shape[:3], affine)  # type: ignore[arg-type]
    ras = apply_orientation(data[..., 0] if data.ndim > SPATIAL_DIMS else data, geometry.ornt)
    return np.ascontiguousarray(ras.transpose(2, 1, 0)), geometry


def from_canonical(canonical: np.ndarray, geometry: CanonicalGeometry) -> np.ndarray:
    """Exact inverse of :func:`to_canonical`: (Z, Y, X) back to the file's (i, j, k) grid."""
    if canonical.shape != geometry.canonical_shape:
        raise ValueError(
            f"array shape {canonical.shape} does not match the canonical grid "
            f"{geometry.canonical_shape} of the original scan"
        )
    ras = canonical.transpose(2, 1, 0)
    flips = tuple(
        slice(None, None, -1) if geometry.ornt[i, 1] < 0 else slice(None) for i in range(3)
    )
    # File axis i is RAS axis ornt[i, 0]; undo the permutation, then undo the flips.
    in_file_order = ras.transpose([int(a) for a in geometry.ornt[:, 0]])
    return np.asfortranarray(in_file_order[flips])


def world_of_indices(affine: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Map an (N, 3) array of (x, y, z) voxel indices to (N, 3) world millimetres."""
    xyz = np.atleast_2d(np.asarray(xyz, dtype=np.float64))
    return xyz @ affine[:3, :3].T + affine[:3, 3]
