"""Synthetic lesions in stage 2's training crops (tumour synthesis).

A few dozen train cases hold a few dozen real lesions: stage 2 learns those and misses
new ones (on the phantoms it scored 0.7-0.9 Dice on its training lesions and half that on
held-out ones). Painting synthetic hypodense lesions into the liver of training crops, as
Hu et al. do ("Label-free liver tumor segmentation", CVPR 2023, where a model trained on
synthetic tumours alone came close to one trained on real ones on LiTS), gives it an
unbounded supply of lesions of every size, shape, contrast and place, real ones included.

A lesion is an ellipsoid in millimetres with a random orientation and a warped
surface, partial volume over one in-plane voxel at its edge, optionally a bright rim. It
darkens the image by its contrast only where the crop is liver (its labels, slice by
slice), so it never leaves the organ, and it keeps the image's own noise and texture.
Its label is tumour where it covers at least half a voxel of liver.

Parameters are drawn with numpy (the sampler's generator, so a resumed run draws the same
lesions); the voxel maths is torch on the crop's device.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from liverpipe.labels import Label
from liverpipe.settings import TumourAugmentConfig

__all__ = ["Lesion", "draw_lesions", "implant_lesions"]

#: Fourier terms of a lesion's surface warp.
_WARP_TERMS = 3
#: A voxel is tumour where a lesion covers at least this fraction of it.
_COVER = 0.5


@dataclass(frozen=True)
class Lesion:
    """One synthetic lesion, in mm about the crop's centre-slice origin (voxel (0, 0))."""

    centre: tuple[float, float, float]  # (z, y, x) mm
    radii: tuple[float, float, float]  # mm along the rotated axes
    rotation: np.ndarray  # (3, 3); columns are the axes, in (z, y, x)
    contrast_hu: float  # how much darker than the tissue it replaces
    rim_hu: float  # brighter rim (0: none)
    rim_mm: float
    warp: np.ndarray  # (_WARP_TERMS, 5): wave vector (z, y, x) per mm, phase, amplitude mm


def draw_lesions(
    rng: np.random.Generator,
    liver_yx: np.ndarray,
    edge_yx: np.ndarray,
    spacing: Sequence[float],
    cfg: TumourAugmentConfig,
) -> list[Lesion]:
    """Lesions for one crop, or none (``1 - cfg.lesions`` of the time, or no liver).

    ``liver_yx`` is (N, 2): the (y, x) voxels of liver on the crop's centre slice, where
    each lesion is centred (its centre moved along z by up to 0.7 of its radius, so that
    the slice cuts it anywhere); ``edge_yx`` (M, 2) the liver voxels at its surface, where
    ``cfg.lesion_border`` of them are centred (subcapsular lesions, cut by the organ's
    outline); ``spacing`` is (x, y, z) in mm.
    """
    if len(liver_yx) == 0 or rng.random() >= cfg.lesions:
        return []
    sx, sy, _ = (float(s) for s in spacing)
    low, high = cfg.lesion_count
    out = []
    for _ in range(int(rng.integers(low, high + 1))):
        diameter = math.exp(rng.uniform(*np.log(cfg.lesion_diameter_mm)))
        radii = diameter / 2 * rng.uniform(0.75, 1.25, size=3)
        where = edge_yx if len(edge_yx) and rng.random() < cfg.lesion_border else liver_yx
        y, x = where[rng.integers(len(where))]
        dz = rng.uniform(-0.7, 0.7) * radii.min()
        rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        waves = rng.normal(size=(_WARP_TERMS, 3))
        waves *= (2 * math.pi / (diameter * rng.uniform(0.6, 1.5, size=(_WARP_TERMS, 1)))) / (
            np.linalg.norm(waves, axis=1, keepdims=True) + 1e-9
        )
        warp = np.concatenate(
            [
                waves,
                rng.uniform(0, 2 * math.pi, size=(_WARP_TERMS, 1)),
                rng.uniform(0, 0.08, size=(_WARP_TERMS, 1)) * radii.min(),
            ],
            axis=1,
        )
        rim = diameter > cfg.lesion_rim_min_mm and rng.random() < cfg.lesion_rim
        out.append(
            Lesion(
                centre=(dz, float(y) * sy, float(x) * sx),
                radii=(float(radii[0]), float(radii[1]), float(radii[2])),
                rotation=rotation,
                contrast_hu=float(rng.uniform(*cfg.lesion_contrast_hu)),
                rim_hu=float(rng.uniform(20.0, 40.0)) if rim else 0.0,
                rim_mm=max(1.5, 0.12 * diameter),
                warp=warp,
            )
        )
    return out


def implant_lesions(
    image: torch.Tensor,
    labels: torch.Tensor,
    lesions: Sequence[Lesion],
    spacing: Sequence[float],
    hu_gain: float,
    clip: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paint ``lesions`` into a crop.

    ``image`` is (k, h, w) float32 liver-relative (``hu_gain`` units per HU), ``labels``
    (k, h, w) int64 for every context slice, ``spacing`` (x, y, z) mm. Returns the new
    image (clipped to [-1, 1] with ``clip``) and the centre slice's labels (h, w), tumour
    where a lesion covers at least half a voxel of liver.
    """
    centre = labels[labels.shape[0] // 2]
    if not lesions:
        return image, centre
    tissue = (labels >= Label.LIVER).to(image.dtype)
    coords = _coordinates(tuple(image.shape), tuple(float(s) for s in spacing), image.device)
    edge = float(min(spacing[0], spacing[1]))
    shade = torch.zeros_like(image)
    inside = torch.zeros_like(image)
    for lesion in lesions:
        window = _window(lesion, spacing, edge, image.shape[1:])
        if window is None:
            continue
        outer, core = _profiles(coords[(slice(None), slice(None), *window)], lesion, edge)
        shade[(slice(None), *window)] += (
            lesion.rim_hu * (outer - core) - lesion.contrast_hu * core
        ) * hu_gain
        inside[(slice(None), *window)] = torch.maximum(inside[(slice(None), *window)], outer)
    out = image + shade * tissue
    if clip:
        out = out.clamp_(-1.0, 1.0)
    mid = image.shape[0] // 2
    tumour = (inside[mid] >= _COVER) & (centre >= Label.LIVER)
    return out, torch.where(tumour, torch.full_like(centre, int(Label.TUMOUR)), centre)


@functools.lru_cache(maxsize=64)
def _coordinates(
    shape: tuple[int, ...], spacing: tuple[float, ...], device: torch.device
) -> torch.Tensor:
    """(3, k, h, w) voxel centres in mm (z, y, x), z = 0 on the centre slice (one per crop
    shape and case spacing; callers never write into it)."""
    k, h, w = shape
    sx, sy, sz = (float(s) for s in spacing)
    z = (torch.arange(k, device=device, dtype=torch.float32) - k // 2) * sz
    y = torch.arange(h, device=device, dtype=torch.float32) * sy
    x = torch.arange(w, device=device, dtype=torch.float32) * sx
    return torch.stack(torch.meshgrid(z, y, x, indexing="ij"))


def _window(
    lesion: Lesion, spacing: Sequence[float], edge_mm: float, size: Sequence[int]
) -> tuple[slice, slice] | None:
    """The in-plane (y, x) voxels the lesion can touch (its warp adds at most a quarter of
    its smallest radius), or None when that lies outside the crop."""
    reach = 1.3 * max(lesion.radii) + edge_mm
    out = []
    for centre, step, n in zip(lesion.centre[1:], (spacing[1], spacing[0]), size, strict=True):
        lo = max(math.floor((centre - reach) / step), 0)
        hi = min(math.ceil((centre + reach) / step) + 1, n)
        if hi <= lo:
            return None
        out.append(slice(lo, hi))
    return out[0], out[1]


def _profiles(
    coords: torch.Tensor, lesion: Lesion, edge_mm: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The lesion's fractional cover of each voxel (outer surface, and inside its rim),
    with a linear partial-volume ramp ``edge_mm`` wide."""
    device = coords.device
    d = coords - torch.tensor(lesion.centre, device=device, dtype=torch.float32).view(3, 1, 1, 1)
    rotation = torch.as_tensor(lesion.rotation, device=device, dtype=torch.float32)
    local = torch.einsum("ij,i...->j...", rotation, d)
    radii = torch.tensor(lesion.radii, device=device, dtype=torch.float32).view(3, 1, 1, 1)
    distance = torch.sqrt(((local / radii) ** 2).sum(0))
    surface = (distance - 1.0) * min(lesion.radii)
    for wave in lesion.warp:
        k = torch.tensor(wave[:3], device=device, dtype=torch.float32).view(3, 1, 1, 1)
        surface = surface + float(wave[4]) * torch.sin((k * d).sum(0) + float(wave[3]))
    outer = (0.5 - surface / edge_mm).clamp(0.0, 1.0)
    if lesion.rim_hu == 0:
        return outer, outer
    core = (0.5 - (surface + lesion.rim_mm) / edge_mm).clamp(0.0, 1.0)
    return outer, core
