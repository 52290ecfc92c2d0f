"""Per-case preprocessing kernels: pure, typed, no Prefect, Dask or store paths.

Order: canonical orientation, resampling to the target spacing, in-plane crop/pad
centred on the body, CT normalisation, storage encoding. Orientation, resampling and
crop/pad are one SimpleITK ``Resample`` onto the stored grid (:func:`stored_grid`),
so a voxel is interpolated once and the file's voxels are never reordered in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import product
from typing import Any

import cc3d
import numpy as np
import SimpleITK as sitk
from nibabel.orientations import apply_orientation

from liverpipe.geometry import CanonicalGeometry, voxel_spacing
from liverpipe.labels import Label
from liverpipe.settings import PreprocessConfig

__all__ = [
    "BODY_STEPS",
    "BodyFootprint",
    "Grid",
    "LabelSupport",
    "ZScoreStats",
    "body_centre",
    "body_footprint",
    "canonical_view",
    "crop_to_labels",
    "edge_clamped_slab",
    "encode",
    "fraction_outside",
    "hu_statistics",
    "normalize_ct",
    "resample_image",
    "resample_label",
    "resample_to_grid",
    "slice_counts",
    "stored_grid",
]

_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline,
    "nearest": sitk.sitkNearestNeighbor,
}
AIR_HU = -1024.0

#: A linearly interpolated mask is inside where it reaches this value (label_linear).
INSIDE = 0.5


@dataclass(frozen=True, eq=False)
class Grid:
    """A stored (Z, Y, X) grid: ``affine`` maps (x, y, z) indices to RAS+ mm.

    ``crop_offset`` is the (z, y, x) index of stored voxel (0, 0, 0) on the uncropped,
    extent-aligned resampled grid; negative values mean padding.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    crop_offset: tuple[int, int, int]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in voxel_spacing(self.affine))  # type: ignore[return-value]


@dataclass(frozen=True)
class ZScoreStats:
    """Dataset-level foreground intensity statistics (nnU-Net's CT normalisation)."""

    low: float
    high: float
    mean: float
    std: float


#: Subsampling (z, y, x) of the canonical volume for body detection.
BODY_STEPS = (2, 4, 4)


@dataclass(frozen=True, eq=False)
class BodyFootprint:
    """Where the body lies in-plane, from the largest connected component above a threshold.

    ``columns`` is the (Y', X') count of body voxels per column of the subsampled
    canonical grid (every ``BODY_STEPS``-th slice, row and column); canonical row ``y``
    is ``y' * BODY_STEPS[1]``. ``columns`` is None when nothing exceeds the threshold.
    """

    shape: tuple[int, int, int]  # the canonical (Z, Y, X) shape it was computed on
    columns: np.ndarray | None

    @property
    def box(self) -> tuple[float, float, float, float] | None:
        """Canonical (x0, x1, y0, y1) index range of the body, or None."""
        if self.columns is None:
            return None
        ys, xs = np.nonzero(self.columns)
        step_y, step_x = BODY_STEPS[1], BODY_STEPS[2]
        return (
            float(xs.min() * step_x),
            float(min(xs.max() * step_x + step_x - 1, self.shape[2] - 1)),
            float(ys.min() * step_y),
            float(min(ys.max() * step_y + step_y - 1, self.shape[1] - 1)),
        )

    @property
    def centre(self) -> np.ndarray:
        """Canonical (x, y) index of the body's bounding-box centre (image centre if none)."""
        if self.columns is None:
            return np.array([(self.shape[2] - 1) / 2, (self.shape[1] - 1) / 2])
        ys, xs = np.nonzero(self.columns)
        lo_x, hi_x = xs.min() * BODY_STEPS[2], xs.max() * BODY_STEPS[2]
        lo_y, hi_y = ys.min() * BODY_STEPS[1], ys.max() * BODY_STEPS[1]
        return np.array([(lo_x + hi_x) / 2, (lo_y + hi_y) / 2])

    def fraction_outside(self, window: tuple[float, float, float, float]) -> float:
        """Fraction of (subsampled) body voxels whose column lies outside ``window``,
        a canonical (x0, x1, y0, y1) index range."""
        if self.columns is None:
            return 0.0
        return fraction_outside(self.columns, window, BODY_STEPS[1:])


def fraction_outside(
    columns: np.ndarray, window: tuple[float, float, float, float], steps: tuple[int, int] = (1, 1)
) -> float:
    """Fraction of the counts in (Y', X') ``columns`` outside a canonical (x0, x1, y0, y1)
    window; column (y', x') sits at canonical (y' * steps[0], x' * steps[1])."""
    total = int(columns.sum())
    if total == 0:
        return 0.0
    ys = np.arange(columns.shape[0]) * steps[0]
    xs = np.arange(columns.shape[1]) * steps[1]
    inside_y = (ys >= window[2]) & (ys <= window[3])
    inside_x = (xs >= window[0]) & (xs <= window[1])
    inside = int(columns[np.ix_(inside_y, inside_x)].sum())
    return (total - inside) / total


def body_footprint(canonical: np.ndarray, threshold_hu: float) -> BodyFootprint:
    """The body's in-plane footprint in a canonical (Z, Y, X) HU volume.

    The body is the largest 6-connected component above ``threshold_hu`` on a subsampled
    copy (``BODY_STEPS``), which keeps the table and stray air pockets out.
    """
    steps = BODY_STEPS
    coarse = np.ascontiguousarray(canonical[:: steps[0], :: steps[1], :: steps[2]] > threshold_hu)
    shape = tuple(int(n) for n in canonical.shape)
    if not coarse.any():
        return BodyFootprint(shape, None)  # type: ignore[arg-type]
    body = cc3d.largest_k(coarse, k=1, connectivity=6) > 0
    return BodyFootprint(shape, body.sum(axis=0))  # type: ignore[arg-type]


def body_centre(canonical: np.ndarray, threshold_hu: float) -> np.ndarray:
    """Canonical (x, y) index of the body's in-plane bounding-box centre.

    See :func:`body_footprint`. Returns the image centre when nothing exceeds the threshold.
    """
    return body_footprint(canonical, threshold_hu).centre


def canonical_view(data: np.ndarray, geometry: CanonicalGeometry) -> np.ndarray:
    """The (Z, Y, X) canonical view of a file-order (i, j, k) array, without copying."""
    return apply_orientation(data, geometry.ornt).transpose(2, 1, 0)


def stored_grid(
    geometry: CanonicalGeometry, centre_xy: np.ndarray, config: PreprocessConfig
) -> Grid:
    """The stored grid: target spacing, full z extent, ``slice_size`` centred on the body.

    Extents are aligned (the resampled volume covers exactly the scan's extent); the
    in-plane crop offset is rounded to whole target voxels so that cropping is exactly
    invertible on the resampled grid.
    """
    canon = geometry.canonical_affine
    source_spacing = voxel_spacing(canon)  # (x, y, z)
    ratio = np.asarray(config.target_spacing) / source_spacing
    z_src, _, _ = geometry.canonical_shape
    nz = max(1, round(z_src / ratio[2]))
    ny, nx = config.slice_size
    aligned = -0.5 + 0.5 * ratio  # continuous source index of resampled voxel 0 (per axis)
    offset_x = round((centre_xy[0] - aligned[0]) / ratio[0] - (nx - 1) / 2)
    offset_y = round((centre_xy[1] - aligned[1]) / ratio[1] - (ny - 1) / 2)
    start = aligned + np.array([offset_x, offset_y, 0]) * ratio
    step = np.eye(4)
    step[:3, :3] = np.diag(ratio)
    step[:3, 3] = start
    return Grid((nz, ny, nx), canon @ step, (0, offset_y, offset_x))


def resample_to_grid(
    canonical: np.ndarray,
    affine: np.ndarray,
    grid: Grid,
    interpolation: str,
    default: float,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Resample a canonical (Z, Y, X) volume with affine ``affine`` onto ``grid``.

    Returns float32 for "linear"/"bspline" and the input's integer type for "nearest";
    with ``out`` (of ``grid``'s shape), the values are cast into it straight from
    SimpleITK's buffer (no intermediate copy) and ``out`` is returned.
    Feeding the canonical array (not the file's order) makes any storage order of the
    same voxels give bit-identical results. SimpleITK only needs the RAS+ frame to be
    one consistent frame for source and target.
    """
    spacing = voxel_spacing(affine)
    source = sitk.GetImageFromArray(np.ascontiguousarray(canonical))
    source.SetSpacing(spacing.tolist())
    source.SetOrigin(affine[:3, 3].tolist())
    source.SetDirection((affine[:3, :3] / spacing).ravel().tolist())
    out_spacing = voxel_spacing(grid.affine)
    pixel = source.GetPixelID() if interpolation == "nearest" else sitk.sitkFloat32
    result = sitk.Resample(
        source,
        [grid.shape[2], grid.shape[1], grid.shape[0]],
        sitk.Transform(),
        _INTERPOLATORS[interpolation],
        grid.affine[:3, 3].tolist(),
        out_spacing.tolist(),
        (grid.affine[:3, :3] / out_spacing).ravel().tolist(),
        default,
        pixel,
    )
    if out is None:
        return sitk.GetArrayFromImage(result)
    out[...] = sitk.GetArrayViewFromImage(result)
    return out


def resample_image(
    canonical: np.ndarray,
    affine: np.ndarray,
    grid: Grid,
    interpolation: str,
    slab: int = 8,
    dtype: type[np.floating[Any]] = np.float32,
) -> np.ndarray:
    """Resample a canonical (Z, Y, X) image onto ``grid`` in slabs of output slices.

    Each slab reads only the source slices it needs (plus an interpolation margin) from
    ``canonical``, which may be a strided view: the whole volume is never copied, which
    bounds memory to the decoded volume plus one slab. For linear interpolation the result
    equals a single full resample; B-spline prefiltering sees a 6-slice margin. Each slab
    is computed in float32 and kept as ``dtype`` (the forward path keeps float16 HU: half
    the memory; rounding at most 2^-11 of the value: 0.0625 HU within ±256 HU).
    """
    out = np.empty(grid.shape, dtype=dtype)
    to_source = np.linalg.inv(affine) @ grid.affine  # stored (x, y, z, 1) -> source index
    margin = 2 if interpolation == "linear" else 6
    depth = canonical.shape[0]
    for z0 in range(0, grid.shape[0], slab):
        z1 = min(z0 + slab, grid.shape[0])
        corners = np.array(
            [
                [x, y, z, 1.0]
                for x, y, z in product((0, grid.shape[2] - 1), (0, grid.shape[1] - 1), (z0, z1 - 1))
            ]
        )
        source_z = (corners @ to_source.T)[:, 2]
        s0 = int(np.clip(np.floor(source_z.min()) - margin, 0, depth - 1))
        s1 = int(np.clip(np.ceil(source_z.max()) + margin + 1, s0 + 1, depth))
        source, first = edge_clamped_slab(canonical, s0, s1)
        shift_out, shift_in = np.eye(4), np.eye(4)
        shift_out[2, 3], shift_in[2, 3] = z0, first
        sub = Grid((z1 - z0, grid.shape[1], grid.shape[2]), grid.affine @ shift_out, (0, 0, 0))
        resample_to_grid(source, affine @ shift_in, sub, interpolation, AIR_HU, out[z0:z1])
    return out


def edge_clamped_slab(volume: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, int]:
    """Slices ``start:stop`` of a (Z, ...) volume, with its first (last) slice repeated once
    before (after) the slab when the slab reaches that end; a contiguous copy.

    Returns the slab and the z index of its first slice in ``volume`` (-1 when padded).
    A stored grid that covers the scan's whole extent puts its end slices' centres up to
    the scan's outer face, half a voxel beyond the last voxel centre: SimpleITK counts the
    face itself as outside the image. The repeated slice clamps those samples to the edge
    voxel instead of the background.
    """
    depth = volume.shape[0]
    before = 1 if start == 0 else 0
    after = 1 if stop == depth else 0
    if not before and not after:  # a plain slice: no copy when the view is contiguous
        return np.ascontiguousarray(volume[start:stop]), start
    index = np.clip(np.arange(start - before, stop + after), 0, depth - 1)
    return np.ascontiguousarray(volume[index]), start - before


@dataclass(frozen=True, eq=False)
class LabelSupport:
    """Where a canonical (Z, Y, X) label map is non-zero: ``columns`` (Y, X) counts its
    labelled voxels per column, ``slices`` (Z,) says which slices hold any."""

    columns: np.ndarray
    slices: np.ndarray

    @classmethod
    def of(cls, canonical: np.ndarray, slab: int = 32) -> LabelSupport:
        """Both in one pass, ``slab`` slices at a time: no scan-sized temporary (numpy's
        ``count_nonzero`` along an axis is 4x slower here than a sum of the mask)."""
        columns = np.zeros(canonical.shape[1:], dtype=np.int64)
        slices = np.zeros(canonical.shape[0], dtype=bool)
        for z0 in range(0, canonical.shape[0], slab):
            labelled = canonical[z0 : z0 + slab] > 0
            columns += labelled.sum(axis=0, dtype=np.uint16)
            slices[z0 : z0 + slab] = labelled.reshape(labelled.shape[0], -1).any(axis=1)
        return cls(columns, slices)

    def box(self, margin: int) -> tuple[slice, slice, slice] | None:
        """The (Z, Y, X) bounding box of the labelled voxels grown by ``margin``, or None."""
        z = np.flatnonzero(self.slices)
        if z.size == 0:
            return None
        y, x = np.flatnonzero(self.columns.any(axis=1)), np.flatnonzero(self.columns.any(axis=0))
        shape = (self.slices.size, *self.columns.shape)
        return tuple(  # type: ignore[return-value]
            slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, n))
            for hits, n in zip((z, y, x), shape, strict=True)
        )


def crop_to_labels(
    canonical: np.ndarray,
    affine: np.ndarray,
    margin: int = 2,
    support: LabelSupport | None = None,
) -> tuple[np.ndarray, np.ndarray] | None:
    """The labelled part of a canonical (Z, Y, X) label map plus ``margin`` voxels (uint8,
    contiguous; the input itself when nothing can be cut) and its affine; None when
    nothing is labelled. Found slab by slab: no temporary is the size of the scan, and
    masks built on the crop are the size of the liver, not of the scan. ``support``, the
    map's :class:`LabelSupport` when the caller has it, saves a pass over the scan."""
    box = _support(canonical, margin) if support is None else support.box(margin)
    if box is None:
        return None
    shift = np.eye(4)
    shift[:3, 3] = (box[2].start, box[1].start, box[0].start)
    return np.ascontiguousarray(canonical[box], dtype=np.uint8), affine @ shift


def resample_label(
    canonical: np.ndarray, affine: np.ndarray, grid: Grid, interpolation: str
) -> np.ndarray:
    """Resample a canonical (Z, Y, X) label map onto ``grid``; uint8 out.

    "label_linear" is one-hot linear interpolation on the nested masks liver (label >= 1)
    and tumour (label == 2): each mask is interpolated linearly and kept where it
    reaches 0.5, so a tumour keeps every stored voxel that it covers at least half of,
    however the grids align, and tumour stays inside liver. "nearest" is nearest
    neighbour. Each mask is resampled only within its bounding box (everything outside
    is background), which makes labels several times cheaper than the image.
    """
    out = np.zeros(grid.shape, dtype=np.uint8)
    cropped = crop_to_labels(canonical, affine)
    if cropped is None:
        return out
    labels, affine = cropped
    if interpolation == "nearest":
        _resample_in_box(labels, labels > 0, affine, grid, out, "nearest", write=_put)
        return out
    liver = labels >= Label.LIVER  # one mask at a time: each is the size of the crop
    _resample_in_box(liver.view(np.uint8), liver, affine, grid, out, "linear", write=_put_liver)
    del liver
    tumour = labels == Label.TUMOUR
    del labels
    # Tumour is marked inside the liver's output where its own mask reaches 0.5: only
    # its box of the grid is touched, with no grid-sized temporary.
    _resample_in_box(tumour.view(np.uint8), tumour, affine, grid, out, "linear", write=_put_tumour)
    return out


def _put(target: np.ndarray, values: np.ndarray) -> None:
    """Resampled labels, as they are (nearest neighbour)."""
    target[...] = values


def _put_liver(target: np.ndarray, values: np.ndarray) -> None:
    """Interpolated liver mask -> uint8 labels (1 where it reaches 0.5), without an
    integer temporary (a bool array viewed as uint8 is 0/1, and 1 is the liver label)."""
    assert int(Label.LIVER) == 1
    target[...] = (values >= INSIDE).view(np.uint8)


def _put_tumour(target: np.ndarray, values: np.ndarray) -> None:
    """Interpolated tumour mask -> tumour where it reaches 0.5, over what is there."""
    target[values >= INSIDE] = Label.TUMOUR


def _resample_in_box(
    values: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    grid: Grid,
    out: np.ndarray,
    interpolation: str,
    *,
    write: Callable[[np.ndarray, np.ndarray], None],
) -> None:
    """Resample ``values`` where ``mask`` has support, onto the matching part of ``grid``:
    ``write(part of out, resampled)`` puts them there."""
    box = _support(mask, margin=2)
    if box is None:
        return
    lo = np.array([box[2].start, box[1].start, box[0].start], dtype=np.float64)  # (x, y, z)
    hi = np.array([box[2].stop, box[1].stop, box[0].stop], dtype=np.float64) - 1
    corners = np.array(
        [[c[0], c[1], c[2], 1.0] for c in product(*zip(lo - 0.5, hi + 0.5, strict=True))]
    )
    to_grid = np.linalg.inv(grid.affine) @ affine
    idx = corners @ to_grid.T
    start = np.clip(np.floor(idx[:, :3].min(axis=0)).astype(int), 0, None)  # (x, y, z)
    stop = np.minimum(np.ceil(idx[:, :3].max(axis=0)).astype(int) + 1, grid.shape[::-1])
    if (stop <= start).any():
        return
    shift = np.eye(4)
    shift[:3, 3] = start
    sub_grid = Grid(tuple(int(v) for v in (stop - start)[::-1]), grid.affine @ shift, (0, 0, 0))  # type: ignore[arg-type]
    slab, first = edge_clamped_slab(values[:, box[1], box[2]], box[0].start, box[0].stop)
    source_shift = np.eye(4)
    source_shift[:3, 3] = (lo[0], lo[1], first)
    resampled = resample_to_grid(slab, affine @ source_shift, sub_grid, interpolation, 0)
    write(out[start[2] : stop[2], start[1] : stop[1], start[0] : stop[0]], resampled)


def _support(mask: np.ndarray, margin: int) -> tuple[slice, slice, slice] | None:
    """Bounding box (Z, Y, X slices) of a mask's non-zero voxels, grown by ``margin``
    (see :class:`LabelSupport`: no temporary is larger than a slab)."""
    return LabelSupport.of(mask).box(margin)


def normalize_ct(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Clip (Z, Y, X) HU to ``window`` and scale to [0, 1]; float32, in place when possible."""
    low, high = window
    out = hu if hu.dtype == np.float32 else hu.astype(np.float32)
    np.clip(out, low, high, out=out)
    out -= np.float32(low)
    out *= np.float32(1.0 / (high - low))
    return out


def zscore_ct(hu: np.ndarray, stats: ZScoreStats) -> np.ndarray:
    """Clip HU to the dataset's foreground percentiles, then z-score; float32."""
    out = hu if hu.dtype == np.float32 else hu.astype(np.float32)
    np.clip(out, stats.low, stats.high, out=out)
    out -= np.float32(stats.mean)
    out *= np.float32(1.0 / stats.std)
    return out


def encode(
    normalised: np.ndarray, dtype: str, value_range: tuple[float, float]
) -> tuple[np.ndarray, float, float]:
    """Encode normalised values for storage; returns (array, scale, offset).

    ``normalised == stored * scale + offset``: exact up to float16 rounding for
    ``"float16"``; ``"uint8"`` quantises ``value_range`` into 255 steps.
    """
    if dtype == "float16":
        return normalised.astype(np.float16), 1.0, 0.0
    low, high = value_range
    scale = (high - low) / 255.0
    quantised = np.rint((normalised - low) / scale)
    return np.clip(quantised, 0, 255).astype(np.uint8), scale, low


def slice_counts(label: np.ndarray) -> dict[str, list[int]]:
    """Voxels of label 1 (liver) and 2 (tumour) per axial slice of a (Z, Y, X) label."""
    return {
        "liver": (label == Label.LIVER).sum(axis=(1, 2)).astype(int).tolist(),
        "tumour": (label == Label.TUMOUR).sum(axis=(1, 2)).astype(int).tolist(),
    }


def hu_statistics(
    hu: np.ndarray, label: np.ndarray | None, body_threshold: float, slab: int = 8
) -> dict[str, float]:
    """HU mean, std and percentiles inside the body and inside the liver (labels 1 and 2)
    of a float16 (Z, Y, X) HU volume, exact over the whole region.

    float16 has 65,536 values, so each region is counted into a histogram of them
    (``slab`` slices at a time): the body's is the whole volume's above
    ``body_threshold``, with no mask and no copy of its values. The moments and the
    percentiles (numpy's linear method) then come from the histogram."""
    if hu.dtype != np.float16:
        raise TypeError(f"hu_statistics counts float16 values, not {hu.dtype}")
    bits = hu.view(np.uint16)
    everything = np.zeros(_FLOAT16_PATTERNS, dtype=np.int64)
    liver = np.zeros(_FLOAT16_PATTERNS, dtype=np.int64)
    for z0 in range(0, hu.shape[0], slab):
        everything += np.bincount(bits[z0 : z0 + slab].ravel(), minlength=_FLOAT16_PATTERNS)
        if label is not None:
            inside = bits[z0 : z0 + slab][label[z0 : z0 + slab] > 0]
            liver += np.bincount(inside, minlength=_FLOAT16_PATTERNS)
    body = np.where(_FLOAT16_VALUES > body_threshold, everything, 0)
    stats: dict[str, float] = {}
    for name, counts in (("body", body), ("liver", liver)):
        found = _histogram_stats(counts)
        if found is not None:
            stats.update({f"{name}_{key}": value for key, value in found.items()})
    return stats


#: Every float16 bit pattern, and its value (NaN patterns sort last and are never counted:
#: the scan's values are checked finite and HU stay far inside float16's range).
_FLOAT16_PATTERNS = 1 << 16
_FLOAT16_VALUES = (
    np.arange(_FLOAT16_PATTERNS, dtype=np.uint32)
    .astype(np.uint16)
    .view(np.float16)
    .astype(np.float64)
)


def _histogram_stats(counts: np.ndarray) -> dict[str, float] | None:
    """Voxel count, mean, std and the 0.5/50/99.5 percentiles of the values whose
    float16 bit patterns ``counts`` counts; None when it counts nothing."""
    present = counts > 0
    if not present.any():
        return None
    values, weights = _FLOAT16_VALUES[present], counts[present]
    order = np.argsort(values, kind="stable")
    values, weights = values[order], weights[order]
    size = int(weights.sum())
    mean = float((weights * values).sum() / size)
    std = float(np.sqrt((weights * np.square(values - mean)).sum() / size))
    last = np.cumsum(weights) - 1  # index of each value's last voxel in the sorted region
    position = np.array([0.005, 0.5, 0.995]) * (size - 1)
    low = np.floor(position)
    below = values[np.searchsorted(last, low)]
    above = values[np.searchsorted(last, np.minimum(low + 1, size - 1))]
    p005, p50, p995 = below + (above - below) * (position - low)
    return {
        "voxels": float(size),
        "mean": mean,
        "std": std,
        "p0.5": float(p005),
        "median": float(p50),
        "p99.5": float(p995),
    }
