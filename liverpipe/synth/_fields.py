"""Smooth random fields and implicit shapes in patient millimetres.

Coordinates are separable grids: ``xs`` (nx,), ``ys`` (ny,), ``zs`` (nz,) in mm; a
volume-valued function returns (nz, ny, nx). Patient axes: +x Right, +y Anterior,
+z Superior (RAS+), origin at the centre of the liver's bounding box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Box", "FourierField", "ellipsoid_sdf", "segment_distance", "smooth_min"]


@dataclass(frozen=True)
class FourierField:
    """Sum of random plane waves: ``sum_m a_m sin(k_m . p + phi_m)``, zero mean.

    ``on_grid`` evaluates a separable grid as one batched matrix product per sub-slice
    (sin(a + b) = sin a cos b + cos a sin b, with b depending on y only), which is what
    makes full-size phantoms fast.
    """

    k: np.ndarray  # (M, 3) rad/mm
    phase: np.ndarray  # (M,)
    amp: np.ndarray  # (M,)

    @classmethod
    def random(
        cls, rng: np.random.Generator, modes: int, wavelength_mm: tuple[float, float], rms: float
    ) -> FourierField:
        direction = rng.normal(size=(modes, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        wavelength = rng.uniform(*wavelength_mm, size=modes)
        k = direction * (2 * np.pi / wavelength)[:, None]
        phase = rng.uniform(0, 2 * np.pi, size=modes)
        amp = np.full(modes, rms * np.sqrt(2.0 / modes))
        return cls(k, phase, amp)

    def at_points(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Evaluate at broadcastable coordinate arrays."""
        out = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z)))
        for (kx, ky, kz), phi, a in zip(self.k, self.phase, self.amp, strict=True):
            out += a * np.sin(kx * x + ky * y + kz * z + phi)
        return out

    def on_grid(self, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray) -> np.ndarray:
        """Evaluate on the separable grid; returns float32 (nz, ny, nx)."""
        beta = np.outer(ys, self.k[:, 1])  # (ny, M)
        left = np.concatenate([np.cos(beta), np.sin(beta)], axis=1).astype(np.float32)
        alpha = (
            zs[:, None, None] * self.k[None, :, 2, None]
            + xs[None, None, :] * self.k[None, :, 0, None]
            + self.phase[None, :, None]
        )  # (nz, M, nx)
        amp = np.concatenate([self.amp, self.amp])[None, :, None]
        right = amp * np.concatenate([np.sin(alpha), np.cos(alpha)], axis=1)
        return np.matmul(left[None], right.astype(np.float32))


@dataclass(frozen=True)
class Box:
    """Axis-aligned bounding box in patient mm: (lo, hi) per axis x, y, z."""

    lo: tuple[float, float, float]
    hi: tuple[float, float, float]

    @classmethod
    def around(cls, centre: np.ndarray, radius: float | np.ndarray) -> Box:
        r = np.broadcast_to(np.asarray(radius, dtype=float), (3,))
        c = np.asarray(centre, dtype=float)
        return cls(tuple(c - r), tuple(c + r))  # type: ignore[arg-type]

    def union(self, other: Box) -> Box:
        lo = tuple(min(a, b) for a, b in zip(self.lo, other.lo, strict=True))
        hi = tuple(max(a, b) for a, b in zip(self.hi, other.hi, strict=True))
        return Box(lo, hi)  # type: ignore[arg-type]


def smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum; blends the two surfaces over about ``k`` mm."""
    # b + (a - b) h - k h (1 - h), h = clip(0.5 + 0.5 (b - a) / k), computed in place: the
    # same operations in the same order (so the same bits), with three temporaries, not ten
    h = np.subtract(b, a)
    h *= 0.5
    h /= k
    h += 0.5
    np.clip(h, 0.0, 1.0, out=h)
    out = np.subtract(a, b)
    out *= h
    out += b
    rest = np.subtract(1.0, h)
    h *= k
    h *= rest
    out -= h
    return out


def ellipsoid_sdf(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: np.ndarray, radii: np.ndarray
) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to an axis-aligned ellipsoid."""
    q = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
    q = q + ((z - centre[2]) / radii[2]) ** 2
    np.sqrt(q, out=q)  # in place from here: one volume-sized array
    q -= 1.0
    q *= float(np.min(radii))
    return q


def segment_distance(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, a: np.ndarray, b: np.ndarray
) -> np.ndarray:
    """Distance (mm) from broadcastable points to the segment a-b."""
    d = b - a
    length2 = float(d @ d)
    px, py, pz = x - a[0], y - a[1], z - a[2]
    t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / length2, 0.0, 1.0)
    return np.sqrt((px - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (pz - t * d[2]) ** 2)
