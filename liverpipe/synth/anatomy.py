"""Random abdominal anatomy, defined in patient millimetres (RAS+).

Every random draw of a case happens here, once, from the case's own generator; the
renderer is a pure function of the resulting :class:`Anatomy`. Axes: +x patient Right,
+y Anterior, +z Superior; the origin is the centre of the liver's bounding box.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import IntEnum

import numpy as np

from liverpipe.synth._fields import FourierField, ellipsoid_sdf, smooth_min

__all__ = ["Anatomy", "Tissue", "Tumour", "Vessel", "sample_anatomy"]


class Tissue(IntEnum):
    """Tissue classes painted by the renderer; labels derive from them."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    BOWEL = 3
    BOWEL_GAS = 4
    LUNG = 5
    HEART = 6
    BONE = 7
    MARROW = 8
    DISC = 9
    CANAL = 10
    AORTA = 11
    IVC = 12
    KIDNEY = 13
    SPLEEN = 14
    STOMACH_WALL = 15
    STOMACH_GAS = 16
    STOMACH_FLUID = 17
    LIVER = 18
    VESSEL = 19
    TUMOUR = 20
    TUMOUR_RIM = 21


#: Tissues labelled liver (1) and tumour (2); hepatic vessels inside the liver count as liver.
LIVER_TISSUES = (Tissue.LIVER, Tissue.VESSEL)
TUMOUR_TISSUES = (Tissue.TUMOUR, Tissue.TUMOUR_RIM)

#: Mean HU ranges per tissue; each case draws one value per tissue.
HU_RANGES: dict[Tissue, tuple[float, float]] = {
    Tissue.AIR: (-1000, -1000),
    Tissue.FAT: (-110, -90),
    Tissue.MUSCLE: (45, 55),
    Tissue.BOWEL: (20, 40),
    Tissue.BOWEL_GAS: (-950, -850),
    Tissue.LUNG: (-870, -820),
    Tissue.HEART: (35, 45),
    Tissue.BONE: (750, 950),
    Tissue.MARROW: (420, 520),
    Tissue.DISC: (70, 90),
    Tissue.CANAL: (10, 20),
    Tissue.AORTA: (160, 195),
    Tissue.IVC: (110, 140),
    Tissue.KIDNEY: (150, 180),
    Tissue.SPLEEN: (45, 60),
    Tissue.STOMACH_WALL: (35, 45),
    Tissue.STOMACH_GAS: (-1000, -980),
    Tissue.STOMACH_FLUID: (5, 20),
    Tissue.LIVER: (52, 68),
    Tissue.VESSEL: (110, 140),
}


@dataclass(frozen=True)
class Tumour:
    """One lesion: rotated ellipsoid with a warped surface, hypodense, optional bright rim."""

    centre: np.ndarray  # mm
    radii: np.ndarray  # mm, along the rotated axes
    rotation: np.ndarray  # 3x3, columns are the ellipsoid axes
    hu: float
    rim_hu: float | None
    rim_mm: float


@dataclass(frozen=True)
class Vessel:
    """A straight vessel segment (portal or hepatic vein branch) inside the liver."""

    a: np.ndarray
    b: np.ndarray
    radius: float


@dataclass(frozen=True)
class Anatomy:
    """All the random parameters of one phantom patient."""

    body_radii: tuple[float, float]  # lateral, AP semi-axes of the skin (mm)
    fat_mm: float
    muscle_mm: float
    spine_y: float
    aorta: tuple[float, float, float]  # x, y, radius
    ivc: tuple[float, float, float, float]  # x, y, rx, ry
    dome: tuple[float, float, float]  # right dome top z, left dome top z, curvature (1/mm)
    liver_lobes: tuple[tuple[np.ndarray, np.ndarray], ...]  # (centre, radii)
    liver_warp: FourierField
    kidneys: tuple[tuple[np.ndarray, np.ndarray], ...]
    spleen: tuple[np.ndarray, np.ndarray, float]  # centre, radii, rotation about z (rad)
    stomach: tuple[np.ndarray, np.ndarray, float]  # centre, radii, air-fluid level y
    rib_levels: tuple[float, ...]  # z (mm) where each rib leaves the spine
    vertebra_period: float
    bowel: FourierField
    bowel_gas: FourierField
    texture: FourierField
    vessels: tuple[Vessel, ...]
    tumours: tuple[Tumour, ...]
    hu: dict[Tissue, float]

    def liver_sdf(
        self, x: np.ndarray, y: np.ndarray, z: np.ndarray, warp: np.ndarray
    ) -> np.ndarray:
        """Signed distance-like function of the liver (mm, negative inside)."""
        (centre, radii), *others = self.liver_lobes
        f = ellipsoid_sdf(x, y, z, centre, radii)
        for centre, radii in others:
            f = smooth_min(f, ellipsoid_sdf(x, y, z, centre, radii), 18.0)
        return np.maximum(f + warp, z - self.dome_z(x, y) + 4.0)

    def liver_sdf_points(self, p: np.ndarray) -> np.ndarray:
        """Liver function at (N, 3) points."""
        x, y, z = p[:, 0], p[:, 1], p[:, 2]
        return self.liver_sdf(x, y, z, self.liver_warp.at_points(x, y, z))

    def dome_z(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Height (mm) of the diaphragm over (x, y); lung lies above it."""
        top_r, top_l, c = self.dome
        right = top_r - c * ((x - 70.0) ** 2 + (y + 10.0) ** 2)
        left = top_l - c * ((x + 75.0) ** 2 + (y + 10.0) ** 2)
        return np.maximum(right, left)


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient: body habitus, organ placement, liver shape, lesions, HU values."""
    size = rng.uniform(0.88, 1.15)
    lateral = rng.uniform(135, 170) * size
    ap = lateral * rng.uniform(0.68, 0.82)
    fat = rng.uniform(8, 32) * size
    muscle = rng.uniform(8, 13)
    spine_y = -ap + fat + muscle + rng.uniform(38, 46)
    hu = {t: float(rng.uniform(*r)) for t, r in HU_RANGES.items()}
    lobes = _liver_lobes(rng, size)
    warp = FourierField.random(rng, 10, (45.0, 130.0), rng.uniform(4.0, 7.0))
    anatomy = Anatomy(
        body_radii=(lateral, ap),
        fat_mm=fat,
        muscle_mm=muscle,
        spine_y=spine_y,
        aorta=(rng.uniform(-22, -10), spine_y + rng.uniform(26, 32), rng.uniform(10, 13.5)),
        ivc=(
            rng.uniform(18, 26),
            spine_y + rng.uniform(30, 38),
            rng.uniform(11, 14),
            rng.uniform(8, 11),
        ),
        dome=(rng.uniform(68, 80) * size, rng.uniform(55, 70) * size, rng.uniform(0.004, 0.007)),
        liver_lobes=lobes,
        liver_warp=warp,
        kidneys=_kidneys(rng, spine_y, size),
        spleen=(
            np.array([-lateral * 0.55, spine_y + 35 * size, 20 * size]),
            np.array([24.0, 52.0, 52.0]) * size,
            rng.uniform(-0.6, -0.3),
        ),
        stomach=(
            np.array([-45.0, 30.0, 15.0]) * size,
            np.array([rng.uniform(32, 45), rng.uniform(28, 38), rng.uniform(45, 60)]) * size,
            rng.uniform(25, 45) * size,
        ),
        rib_levels=tuple(
            float(z) for z in np.arange(rng.uniform(70, 95), -130, -rng.uniform(24, 30))
        ),
        vertebra_period=rng.uniform(30, 36) * size,
        bowel=FourierField.random(rng, 12, (25.0, 60.0), 1.0),
        bowel_gas=FourierField.random(rng, 12, (12.0, 30.0), 1.0),
        texture=FourierField.random(rng, 10, (8.0, 40.0), 1.0),
        vessels=(),
        tumours=(),
        hu=hu,
    )
    vessels = _vessel_tree(rng, anatomy, size)
    tumours = _tumours(rng, anatomy)
    return replace(anatomy, vessels=vessels, tumours=tumours)


def _liver_lobes(
    rng: np.random.Generator, size: float
) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    jitter = lambda s: rng.uniform(1 - s, 1 + s)  # noqa: E731
    right = (
        np.array([62.0, -5.0, 0.0]) * size,
        np.array([68 * jitter(0.12), 80 * jitter(0.12), 72 * jitter(0.15)]) * size,
    )
    left = (
        np.array([-18.0 * jitter(0.3), 40.0, 22.0]) * size,
        np.array([58 * jitter(0.2), 30 * jitter(0.2), 40 * jitter(0.2)]) * size,
    )
    caudate = (np.array([20.0, -12.0, 10.0]) * size, np.array([20.0, 24.0, 35.0]) * size)
    inferior = (
        np.array([75.0, 5.0, -45.0]) * size,
        np.array([45 * jitter(0.2), 55 * jitter(0.2), 45 * jitter(0.2)]) * size,
    )
    return (right, left, caudate, inferior)


def _kidneys(
    rng: np.random.Generator, spine_y: float, size: float
) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    out = []
    for side, z in ((1.0, -85.0), (-1.0, -65.0)):
        centre = np.array([side * rng.uniform(62, 75), spine_y + rng.uniform(0, 10), z * size])
        out.append((centre, np.array([26.0, 22.0, 52.0]) * size * rng.uniform(0.9, 1.1)))
    return tuple(out)


def _inside_liver(
    anatomy: Anatomy, rng: np.random.Generator, n: int, depth: tuple[float, float]
) -> np.ndarray:
    """Up to ``n`` random points whose liver function lies within ``depth`` (mm)."""
    lo = np.array([-60.0, -90.0, -110.0])
    hi = np.array([150.0, 90.0, 90.0])
    pts = rng.uniform(lo, hi, size=(4000, 3))
    f = anatomy.liver_sdf_points(pts)
    ok = pts[(f >= depth[0]) & (f <= depth[1])]
    return ok[:n]


def _vessel_tree(rng: np.random.Generator, anatomy: Anatomy, size: float) -> tuple[Vessel, ...]:
    """Portal branches fanning from the hilum and hepatic veins converging on the IVC."""
    vessels: list[Vessel] = []
    hilum = np.array([35.0, 5.0, -15.0]) * size
    targets = _inside_liver(anatomy, rng, 4, (-60.0, -25.0))
    for target in targets:
        _branch(rng, vessels, hilum, target - hilum, rng.uniform(5.0, 7.0), 3)
    ivc_top = np.array([anatomy.ivc[0], anatomy.ivc[1], 40.0 * size])
    for target in _inside_liver(anatomy, rng, 3, (-50.0, -20.0)):
        vessels.append(Vessel(ivc_top, target + np.array([0.0, 0.0, 25.0]), rng.uniform(4.0, 6.0)))
    return tuple(vessels)


def _branch(
    rng: np.random.Generator,
    out: list[Vessel],
    start: np.ndarray,
    vec: np.ndarray,
    radius: float,
    depth: int,
) -> None:
    end = start + vec
    out.append(Vessel(start, end, radius))
    if depth <= 1:
        return
    for _ in range(2):
        turn = rng.normal(scale=0.6, size=3)
        child = 0.65 * (vec + np.linalg.norm(vec) * turn * 0.6)
        _branch(rng, out, end, child, radius * 0.68, depth - 1)


def _tumours(rng: np.random.Generator, anatomy: Anatomy) -> tuple[Tumour, ...]:
    count = 0 if rng.random() < 0.2 else int(rng.integers(1, 6))
    liver_hu = anatomy.hu[Tissue.LIVER]
    tumours = []
    for _ in range(count):
        diameter = float(np.exp(rng.uniform(np.log(5.0), np.log(60.0))))
        touches_border = rng.random() < 0.3
        depth = (-diameter / 4, 0.0) if touches_border else (-80.0, -diameter / 2)
        centres = _inside_liver(anatomy, rng, 1, depth)
        if len(centres) == 0:
            continue
        rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        rim = rng.random() < 0.3 and diameter > 12
        tumours.append(
            Tumour(
                centre=centres[0],
                radii=diameter / 2 * rng.uniform(0.8, 1.2, size=3),
                rotation=rotation,
                hu=liver_hu - rng.uniform(12.0, 38.0),
                rim_hu=liver_hu + rng.uniform(20.0, 40.0) if rim else None,
                rim_mm=max(1.5, 0.12 * diameter),
            )
        )
    return tuple(tumours)
