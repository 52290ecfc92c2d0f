"""The tumour stage's region of interest and input: pure numpy, shared by training and
inference so that stage 2 sees at prediction time what it trained on.

The ROI is the bounding box of the liver (stage 1's largest liver component at
inference, the ground truth in training) grown by a margin in millimetres and, in-plane,
to a multiple of the encoders' stride. Stage 2 reads the image inside it relative to
the liver's median: ``(value - median) * gain``, where ``gain`` turns stored units into
units of ``relative_window_hu``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Box",
    "bounding_box",
    "crop",
    "fit_to_multiple",
    "grow",
    "liver_box",
    "liver_median",
    "margin_voxels",
    "relative",
    "relative_gain",
]


@dataclass(frozen=True)
class Box:
    """A half-open (Z, Y, X) index box: ``z0 <= z < z1`` and so on."""

    z0: int
    z1: int
    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.z1 - self.z0, self.y1 - self.y0, self.x1 - self.x0)

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return slice(self.z0, self.z1), slice(self.y0, self.y1), slice(self.x0, self.x1)

    def clip(self, shape: Sequence[int]) -> Box:
        """The part of the box inside an array of ``shape``."""
        z, y, x = shape[:3]
        return Box(
            max(self.z0, 0),
            min(self.z1, z),
            max(self.y0, 0),
            min(self.y1, y),
            max(self.x0, 0),
            min(self.x1, x),
        )


def bounding_box(*volumes: np.ndarray) -> tuple[slice, slice, slice] | None:
    """The bounding box (slices) of the non-zero voxels of any of the (Z, Y, X) volumes,
    from per-axis projections (no full-size index arrays), or None when all are zero."""
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(np.logical_or.reduce([np.any(v, axis=others) for v in volumes]))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return box[0], box[1], box[2]


def liver_box(mask: np.ndarray) -> Box | None:
    """Bounding box of the non-zero voxels of a (Z, Y, X) mask, or None when empty."""
    found = bounding_box(mask)
    if found is None:
        return None
    z, y, x = found
    return Box(z.start, z.stop, y.start, y.stop, x.start, x.stop)


def margin_voxels(margin_mm: float, spacing: Sequence[float]) -> tuple[int, int, int]:
    """A margin in mm as whole (z, y, x) voxels; ``spacing`` is (x, y, z) in mm."""
    x, y, z = (float(s) for s in spacing)
    return tuple(math.ceil(margin_mm / s - 1e-9) for s in (z, y, x))  # type: ignore[return-value]


def grow(box: Box, margin: Sequence[int]) -> Box:
    """The box grown by ``margin`` (z, y, x) voxels on every side (not clipped)."""
    mz, my, mx = margin
    return Box(box.z0 - mz, box.z1 + mz, box.y0 - my, box.y1 + my, box.x0 - mx, box.x1 + mx)


def fit_to_multiple(box: Box, multiple: int) -> Box:
    """Grow the in-plane extent to a multiple of ``multiple``, about its centre."""
    out = []
    for lo, hi in ((box.y0, box.y1), (box.x0, box.x1)):
        extra = -(hi - lo) % multiple
        out += [lo - extra // 2, hi + extra - extra // 2]
    return Box(box.z0, box.z1, *out)


def crop(volume: np.ndarray, box: Box, fill: float) -> np.ndarray:
    """``volume[box]`` for a (Z, Y, X) volume, with ``fill`` where the box leaves it."""
    out = np.full(box.shape, fill, dtype=volume.dtype)
    inside = box.clip(volume.shape)
    if min(inside.shape) <= 0:
        return out
    out[
        inside.z0 - box.z0 : inside.z1 - box.z0,
        inside.y0 - box.y0 : inside.y1 - box.y0,
        inside.x0 - box.x0 : inside.x1 - box.x0,
    ] = volume[inside.slices]
    return out


def liver_median(image: np.ndarray, liver: np.ndarray) -> float:
    """Median image value inside the liver mask (tumour included); the image's median
    when the mask is empty."""
    values = image[liver] if liver.any() else image
    return float(np.median(values))


def relative_gain(hu_per_unit: float, window_hu: float) -> float:
    """The ``gain`` of :func:`relative`: stored units (``hu_per_unit`` HU each) to units of
    ``window_hu`` HU. The one formula that training and prediction both use."""
    return hu_per_unit / window_hu


def relative(image: np.ndarray, median: float, gain: float, clip: bool = False) -> np.ndarray:
    """Stage 2's input: ``(image - median) * gain`` in float32; ``clip``: within [-1, 1]."""
    out = (np.asarray(image, dtype=np.float32) - np.float32(median)) * np.float32(gain)
    return np.clip(out, -1.0, 1.0, out=out) if clip else out
