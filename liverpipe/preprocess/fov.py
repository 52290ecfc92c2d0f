"""The stored grid's coverage: thin scans, grid size caps and the in-plane field of view.

The stored grid keeps a fixed in-plane crop (``[preprocess] slice_size``) centred on the
body. These functions say how much of the body and of the labels lie outside it, widen
a grid on its own lattice to hold the whole body (for prediction), and refuse scans the
grid cannot represent. Indices are canonical (x, y) voxel indices (``geometry``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from liverpipe.errors import InvalidScanError
from liverpipe.geometry import CanonicalGeometry
from liverpipe.io import NiftiInfo
from liverpipe.preprocess.kernels import BodyFootprint, Grid, LabelSupport
from liverpipe.settings import CheckConfig, PreprocessConfig

__all__ = [
    "SIZE_MULTIPLE",
    "FovReport",
    "check_grid_size",
    "check_thickness",
    "crop_window",
    "fov_findings",
    "label_columns",
    "needed_size",
    "widen_to_body",
]

#: In-plane sizes of a widened prediction grid are multiples of this (the encoders' stride).
SIZE_MULTIPLE = 32


@dataclass(frozen=True)
class FovReport:
    """How much of the scan the stored in-plane crop (``[preprocess] slice_size``) keeps.

    ``body_outside`` is the fraction of body voxels (counted on the subsampled body mask)
    outside the crop, ``label_outside`` that of labelled voxels (None without a label);
    ``needed_size`` is the (Y, X) slice size that would hold the whole body;
    ``label_voxels`` counts the label's non-zero voxels on the scan's grid (None without
    a label); ``body_found`` is False when no voxel exceeds the body threshold.
    """

    body_outside: float
    label_outside: float | None
    needed_size: tuple[int, int]
    label_voxels: int | None = None
    body_found: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "body_outside": round(self.body_outside, 6),
            "label_outside": None if self.label_outside is None else round(self.label_outside, 6),
            "needed_slice_size": list(self.needed_size),
            "label_voxels": self.label_voxels,
            "body_found": self.body_found,
        }


def check_thickness(
    info: NiftiInfo, geometry: CanonicalGeometry, config: PreprocessConfig, limits: CheckConfig
) -> None:
    """Refuse scans with fewer axial slices than ``[check] min_slices``, or spanning less
    than one stored slice (``[preprocess] target_spacing`` z) along the body axis."""
    slices = geometry.canonical_shape[0]
    spacing_z = geometry.spacing[2]
    extent = slices * spacing_z
    if slices < limits.min_slices:
        raise InvalidScanError(
            info.path,
            f"the scan has {slices} axial slice(s); at least {limits.min_slices} are needed "
            "(a 2.5D model reads adjacent slices as context)",
            "pass the whole CT volume, not a single slice or a localiser; "
            "[check] min_slices sets the limit",
        )
    if extent < config.target_spacing[2]:
        raise InvalidScanError(
            info.path,
            f"the scan spans {extent:.3g} mm along the body axis, less than one stored slice "
            f"({config.target_spacing[2]:g} mm)",
            "pass the whole CT volume; check that the slice spacing (pixdim[3]) is right",
        )


def check_grid_size(path: Path, grid: Grid, limits: CheckConfig) -> None:
    voxels = math.prod(grid.shape)  # Python ints: a corrupt header can overflow int64
    if max(grid.shape) > limits.max_dim or voxels > limits.max_voxels:
        raise InvalidScanError(
            path,
            f"the scan would need a stored grid of {grid.shape} voxels (Z, Y, X); the limits "
            f"are {limits.max_dim} per axis and {limits.max_voxels} voxels",
            "check the voxel spacing (pixdim) in the header, or raise [check] max_dim / max_voxels",
        )


def crop_window(geometry: CanonicalGeometry, grid: Grid) -> tuple[float, float, float, float]:
    """The canonical (x0, x1, y0, y1) index range of voxel centres that ``grid`` covers."""
    to_canonical = np.linalg.inv(geometry.canonical_affine) @ grid.affine
    ratio = np.diag(to_canonical)[:2]
    start = to_canonical[:2, 3]
    last = start + (np.array([grid.shape[2], grid.shape[1]]) - 1) * ratio
    lo, hi = start - ratio / 2, last + ratio / 2
    return (float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1]))


def stored_index_range(
    geometry: CanonicalGeometry, grid: Grid, box: tuple[float, float, float, float]
) -> tuple[int, int, int, int]:
    """Stored (x) and (y) index ranges holding a canonical (x0, x1, y0, y1) box."""
    to_canonical = np.linalg.inv(geometry.canonical_affine) @ grid.affine
    ratio, start = np.diag(to_canonical)[:2], to_canonical[:2, 3]
    lo = (np.array([box[0], box[2]]) - start) / ratio
    hi = (np.array([box[1], box[3]]) - start) / ratio
    return (
        math.floor(lo[0] + 0.5),
        math.ceil(hi[0] - 0.5),
        math.floor(lo[1] + 0.5),
        math.ceil(hi[1] - 0.5),
    )


def needed_size(body: BodyFootprint, geometry: CanonicalGeometry, grid: Grid) -> tuple[int, int]:
    box = body.box
    if box is None:
        return (grid.shape[1], grid.shape[2])
    x0, x1, y0, y1 = stored_index_range(geometry, grid, box)
    return (y1 - y0 + 1, x1 - x0 + 1)


def widen_to_body(
    geometry: CanonicalGeometry, grid: Grid, body: BodyFootprint
) -> tuple[Grid, tuple[slice, slice]]:
    """``grid`` widened in-plane (on its own lattice) to hold the whole body; in-plane
    sizes grow to multiples of :data:`SIZE_MULTIPLE`. Returns it and the (Y, X) window
    where the original grid lies inside it."""
    box = body.box
    assert box is not None, "a body reaches outside the crop only when there is one"
    x0, x1, y0, y1 = stored_index_range(geometry, grid, box)
    _, ny, nx = grid.shape
    lo_y, hi_y = _padded_range(min(0, y0), max(ny - 1, y1))
    lo_x, hi_x = _padded_range(min(0, x0), max(nx - 1, x1))
    shift = np.eye(4)
    shift[:2, 3] = (lo_x, lo_y)
    z, y, x = grid.crop_offset
    wide = Grid(
        (grid.shape[0], hi_y - lo_y + 1, hi_x - lo_x + 1),
        grid.affine @ shift,
        (z, y + lo_y, x + lo_x),
    )
    return wide, (slice(-lo_y, -lo_y + ny), slice(-lo_x, -lo_x + nx))


def _padded_range(lo: int, hi: int) -> tuple[int, int]:
    """Grow [lo, hi] on both sides to a length that is a multiple of SIZE_MULTIPLE."""
    extra = -(hi - lo + 1) % SIZE_MULTIPLE
    return lo - extra // 2, hi + extra - extra // 2


def fov_findings(
    path: Path,
    fov: FovReport,
    config: PreprocessConfig,
    limits: CheckConfig,
    label_path: Path | None = None,
) -> list[str]:
    """Warnings about the crop, a blank scan and an empty label (named by ``label_path``);
    raises when labelled voxels would be lost and the policy is to refuse."""
    needed = f"{fov.needed_size[0]} x {fov.needed_size[1]}"
    size = f"{config.slice_size[0]} x {config.slice_size[1]}"
    found = []
    if fov.label_outside:
        problem = (
            f"{fov.label_outside:.2%} of the labelled voxels lie outside the stored "
            f"{size} in-plane crop and would be lost from training (the body needs {needed})"
        )
        fix = (
            f"raise [preprocess] slice_size to at least {needed}, or set [check] "
            "label_outside_crop = 'warn' to store the case without them"
        )
        if limits.label_outside_crop == "refuse":
            raise InvalidScanError(path, problem, fix)
        found.append(f"{path}: {problem}. Fix: {fix}.")
    if not fov.body_found:
        found.append(
            f"{path}: no voxel is above {config.body_threshold_hu:g} HU ([preprocess] "
            "body_threshold_hu), so the scan shows no body: it is blank, or its values are "
            "not HU. Fix: check the export (a CT in HU has tissue between -100 and 100 HU "
            "and air near -1000)."
        )
    if fov.label_voxels == 0:
        found.append(
            f"{label_path or path}: the label marks no voxel as liver or tumour (all "
            f"background), so the case teaches the models that {path.name} shows no liver. "
            "Fix: check that the label file belongs to this scan and was exported with its "
            "segments; keep it only if the scan really shows no liver."
        )
    if fov.body_outside > 0:
        found.append(
            f"{path}: {fov.body_outside:.2%} of the body lies outside the stored {size} "
            f"in-plane crop (the body needs {needed}); training does not see it, prediction "
            f"widens its grid to cover it. Fix: raise [preprocess] slice_size to {needed} "
            "if the cut-off tissue matters."
        )
    return found


def label_columns(canonical_label: np.ndarray) -> np.ndarray:
    """(Y, X) count of labelled (non-zero) voxels per column of a canonical (Z, Y, X)
    label, slab by slab (no full-size boolean temporary)."""
    return LabelSupport.of(canonical_label).columns
