"""Paint an :class:`Anatomy` onto a separable patient-mm grid.

``paint`` is pure: the same anatomy and grid give the same arrays. Later tissues
overwrite earlier ones, in the order of the ``_paint_*`` calls in :func:`paint`.
"""

from __future__ import annotations

import numpy as np

from liverpipe.labels import Label
from liverpipe.synth._fields import Box, ellipsoid_sdf, segment_distance
from liverpipe.synth.anatomy import LIVER_TISSUES, TUMOUR_TISSUES, Anatomy, Tissue, Tumour

__all__ = ["label_of", "paint"]

_TEXTURE_HU = np.zeros(len(Tissue), dtype=np.float32)
for _t in (Tissue.MUSCLE, Tissue.LIVER, Tissue.SPLEEN, Tissue.KIDNEY, Tissue.TUMOUR, Tissue.BOWEL):
    _TEXTURE_HU[_t] = 4.0
_TEXTURE_HU[Tissue.FAT] = 6.0
_TEXTURE_HU[Tissue.LUNG] = 25.0
_TEXTURE_HU[Tissue.MARROW] = 30.0

_LABEL_LUT = np.zeros(len(Tissue), dtype=np.uint8)
_LABEL_LUT[list(LIVER_TISSUES)] = Label.LIVER
_LABEL_LUT[list(TUMOUR_TISSUES)] = Label.TUMOUR


def label_of(tissue: np.ndarray) -> np.ndarray:
    """uint8 labels (0 background, 1 liver, 2 tumour) of a tissue map."""
    return _LABEL_LUT[tissue]


class _Canvas:
    """Tissue and HU arrays of one slab, with bounding-box views."""

    def __init__(self, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray, anatomy: Anatomy) -> None:
        self.xs, self.ys, self.zs = xs, ys, zs
        shape = (len(zs), len(ys), len(xs))
        self.tissue = np.zeros(shape, dtype=np.uint8)
        self.hu = np.full(shape, anatomy.hu[Tissue.AIR], dtype=np.float32)
        self.lut = np.array(
            [anatomy.hu[t] if t in anatomy.hu else 0.0 for t in Tissue], dtype=np.float32
        )

    def view(
        self, box: Box
    ) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray, np.ndarray] | None:
        """Index slices and broadcastable (Z, Y, X) coordinates inside ``box``; None if empty."""
        sl = []
        for axis, coords in ((2, self.zs), (1, self.ys), (0, self.xs)):
            lo = int(np.searchsorted(coords, box.lo[axis], side="left"))
            hi = int(np.searchsorted(coords, box.hi[axis], side="right"))
            if hi <= lo:
                return None
            sl.append(slice(lo, hi))
        zs, ys, xs = self.zs[sl[0]], self.ys[sl[1]], self.xs[sl[2]]
        return (sl[0], sl[1], sl[2]), xs[None, None, :], ys[None, :, None], zs[:, None, None]

    def set(
        self,
        where: tuple[slice, slice, slice],
        mask: np.ndarray,
        tissue: Tissue,
        hu: float | None = None,
    ) -> None:
        t, h = self.tissue[where], self.hu[where]
        # copyto broadcasts the mask and builds no index arrays (masks are often 2D)
        np.copyto(t, np.uint8(tissue), where=mask)
        np.copyto(h, self.lut[tissue] if hu is None else np.float32(hu), where=mask)


def paint(
    anatomy: Anatomy, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Render HU (float32) and tissue (uint8), both (nz, ny, nx), at the given coordinates.

    ``xs``, ``ys``, ``zs`` are ascending patient millimetres (RAS+). No noise is added.
    """
    c = _Canvas(xs, ys, zs, anatomy)
    _paint_body(c, anatomy)
    _paint_cavity(c, anatomy)
    _paint_organs(c, anatomy)
    _paint_liver(c, anatomy)
    _paint_vessels_of_trunk(c, anatomy)
    _paint_spine(c, anatomy)
    _paint_ribs(c, anatomy)
    texture = anatomy.texture.on_grid(xs, ys, zs)
    c.hu += texture * _TEXTURE_HU[c.tissue]
    return c.hu, c.tissue


def _superellipse(x: np.ndarray, y: np.ndarray, a: float, b: float, p: float = 2.4) -> np.ndarray:
    return (np.abs(x / a) ** p + np.abs(y / b) ** p) ** (1.0 / p)


def _everything(c: _Canvas) -> Box:
    return Box((c.xs[0], c.ys[0], c.zs[0]), (c.xs[-1], c.ys[-1], c.zs[-1]))


def _paint_body(c: _Canvas, a: Anatomy) -> None:
    where, x, y, _ = c.view(_everything(c))  # type: ignore[misc]
    lat, ap = a.body_radii
    c.set(where, _superellipse(x, y, lat, ap) <= 1.0, Tissue.FAT)
    inner = a.fat_mm
    c.set(where, _superellipse(x, y, lat - inner, ap - inner) <= 1.0, Tissue.MUSCLE)
    wall = inner + a.muscle_mm
    c.set(where, _superellipse(x, y, lat - wall, ap - wall) <= 1.0, Tissue.FAT)
    below_fat = _superellipse(x, y, lat - inner, ap - inner) <= 1.0
    for side in (-1.0, 1.0):
        paraspinal = ((x - side * 33.0) / 26.0) ** 2 + ((y - a.spine_y + 42.0) / 22.0) ** 2 <= 1.0
        c.set(where, paraspinal & below_fat, Tissue.MUSCLE)


def _cavity_mask(c: _Canvas, a: Anatomy, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    wall = a.fat_mm + a.muscle_mm
    return _superellipse(x, y, a.body_radii[0] - wall, a.body_radii[1] - wall) <= 1.0


def _paint_cavity(c: _Canvas, a: Anatomy) -> None:
    """Bowel loops and gas below the diaphragm, lung bases and heart above it."""
    lat, ap = a.body_radii
    box = Box((-lat, -ap, c.zs[0]), (lat, ap, c.zs[-1]))
    view = c.view(box)
    if view is None:
        return
    where, x, y, z = view
    cavity = _cavity_mask(c, a, x, y) & (c.tissue[where] == Tissue.FAT)
    gx, gy, gz = c.xs[where[2]], c.ys[where[1]], c.zs[where[0]]
    bowel_level = np.clip((-(z - a.dome[0] + 60.0)) / 40.0, 0.0, 1.0)
    bowel = (a.bowel.on_grid(gx, gy, gz) * bowel_level > 0.35) & cavity
    c.set(where, bowel, Tissue.BOWEL)
    c.set(where, bowel & (a.bowel_gas.on_grid(gx, gy, gz) > 1.7), Tissue.BOWEL_GAS)
    above = (z > a.dome_z(x, y)) & _cavity_mask(c, a, x, y)
    c.set(where, above, Tissue.LUNG)
    heart = ellipsoid_sdf(
        x, y, z, np.array([-15.0, 15.0, a.dome[1] + 40.0]), np.array([60.0, 50.0, 45.0])
    )
    c.set(where, above & (heart < 0), Tissue.HEART)


def _paint_organs(c: _Canvas, a: Anatomy) -> None:
    for centre, radii in a.kidneys:
        view = c.view(Box.around(centre, radii))
        if view is not None:
            where, x, y, z = view
            c.set(where, ellipsoid_sdf(x, y, z, centre, radii) < 0, Tissue.KIDNEY)
            sinus = centre - np.array([np.sign(centre[0]) * 9.0, 0.0, 0.0])
            c.set(where, ellipsoid_sdf(x, y, z, sinus, radii * 0.42) < 0, Tissue.FAT)
    centre, radii, angle = a.spleen
    view = c.view(Box.around(centre, radii.max()))
    if view is not None:
        where, x, y, z = view
        xr = (x - centre[0]) * np.cos(angle) + (y - centre[1]) * np.sin(angle)
        yr = -(x - centre[0]) * np.sin(angle) + (y - centre[1]) * np.cos(angle)
        inside = ellipsoid_sdf(xr, yr, z, np.array([0.0, 0.0, centre[2]]), radii) < 0
        c.set(where, inside & (c.tissue[where] != Tissue.AIR), Tissue.SPLEEN)
    centre, radii, level = a.stomach
    view = c.view(Box.around(centre, radii))
    if view is not None:
        where, x, y, z = view
        e = ellipsoid_sdf(x, y, z, centre, radii)
        c.set(where, e < 0, Tissue.STOMACH_WALL)
        c.set(where, (e < -4.0) & (y <= level), Tissue.STOMACH_FLUID)
        c.set(where, (e < -4.0) & (y > level), Tissue.STOMACH_GAS)


def _liver_box(a: Anatomy) -> Box:
    box = Box.around(*a.liver_lobes[0])
    for centre, radii in a.liver_lobes[1:]:
        box = box.union(Box.around(centre, radii))
    return Box.around((np.array(box.lo) + box.hi) / 2, (np.array(box.hi) - box.lo) / 2 + 20.0)


def _paint_liver(c: _Canvas, a: Anatomy) -> None:
    """Liver fills free abdominal space; vessels and tumours are painted inside it only."""
    view = c.view(_liver_box(a))
    if view is None:
        return
    where, x, y, z = view
    warp = a.liver_warp.on_grid(c.xs[where[2]], c.ys[where[1]], c.zs[where[0]])
    free = np.isin(c.tissue[where], (Tissue.FAT, Tissue.BOWEL, Tissue.BOWEL_GAS))
    c.set(where, (a.liver_sdf(x, y, z, warp) < 0) & free & _cavity_mask(c, a, x, y), Tissue.LIVER)
    for vessel in a.vessels:
        lo = np.minimum(vessel.a, vessel.b) - vessel.radius
        hi = np.maximum(vessel.a, vessel.b) + vessel.radius
        view = c.view(Box(tuple(lo), tuple(hi)))  # type: ignore[arg-type]
        if view is not None:
            where, x, y, z = view
            inside = segment_distance(x, y, z, vessel.a, vessel.b) < vessel.radius
            c.set(where, inside & (c.tissue[where] == Tissue.LIVER), Tissue.VESSEL)
    for tumour in a.tumours:
        _paint_tumour(c, a, tumour)


def _paint_tumour(c: _Canvas, a: Anatomy, tumour: Tumour) -> None:
    view = c.view(Box.around(tumour.centre, tumour.radii.max() * 1.3))
    if view is None:
        return
    where, x, y, z = view
    d = (x - tumour.centre[0], y - tumour.centre[1], z - tumour.centre[2])
    q2 = sum(
        (
            (
                d[0] * tumour.rotation[0, i]
                + d[1] * tumour.rotation[1, i]
                + d[2] * tumour.rotation[2, i]
            )
            / tumour.radii[i]
        )
        ** 2
        for i in range(3)
    )
    lobulation = a.texture.on_grid(c.xs[where[2]], c.ys[where[1]], c.zs[where[0]])
    e = (np.sqrt(q2) - 1.0) * tumour.radii.min() + 0.12 * tumour.radii.min() * lobulation
    in_liver = np.isin(c.tissue[where], (*LIVER_TISSUES, *TUMOUR_TISSUES))
    if tumour.rim_hu is not None:
        c.set(where, (e < 0) & in_liver, Tissue.TUMOUR_RIM, tumour.rim_hu)
        c.set(where, (e < -tumour.rim_mm) & in_liver, Tissue.TUMOUR, tumour.hu)
    else:
        c.set(where, (e < 0) & in_liver, Tissue.TUMOUR, tumour.hu)


def _paint_vessels_of_trunk(c: _Canvas, a: Anatomy) -> None:
    where, x, y, z = c.view(_everything(c))  # type: ignore[misc]
    ax, ay, ar = a.aorta
    c.set(where, (x - ax) ** 2 + (y - ay) ** 2 <= ar**2, Tissue.AORTA)
    ix, iy, rx, ry = a.ivc
    ivc = (((x - ix) / rx) ** 2 + ((y - iy) / ry) ** 2 <= 1.0) & (z < a.dome[0] + 15.0)
    c.set(where, ivc, Tissue.IVC)


def _paint_spine(c: _Canvas, a: Anatomy) -> None:
    sy = a.spine_y
    view = c.view(Box((-45.0, sy - 75.0, c.zs[0]), (45.0, sy + 20.0, c.zs[-1])))
    if view is None:
        return
    where, x, y, z = view
    phase = np.mod(z, a.vertebra_period)
    disc = phase < 7.0
    body = ((x / 21.0) ** 2 + ((y - sy) / 17.0) ** 2) ** 0.5
    c.set(where, body <= 1.0, Tissue.BONE)
    c.set(where, (body <= 1.0 - 2.5 / 17.0) & ~disc, Tissue.MARROW)
    c.set(where, (body <= 1.0) & disc, Tissue.DISC)
    canal_y = sy - 17.0 - 9.0
    r_canal = np.hypot(x, y - canal_y)
    c.set(where, (r_canal <= 13.0) & ~disc, Tissue.BONE)
    c.set(where, r_canal <= 8.0, Tissue.CANAL)
    mid = (phase > 8.0) & (phase < a.vertebra_period - 6.0)
    spinous = (x / 5.0) ** 2 + ((y - canal_y + 26.0) / 14.0) ** 2 <= 1.0
    c.set(where, spinous & mid, Tissue.BONE)
    for side in (-1.0, 1.0):
        transverse = ((x - side * 30.0) / 16.0) ** 2 + ((y - canal_y - 2.0) / 5.0) ** 2 <= 1.0
        c.set(where, transverse & (phase > 11.0) & (phase < 20.0), Tissue.BONE)


def _paint_ribs(c: _Canvas, a: Anatomy) -> None:
    """Ribs leave the spine at ``rib_levels`` and descend as they wind anteriorly.

    The rib path depends on (x, y) only, so the wall pixels are found once and each rib
    level tests z on those pixels alone.
    """
    x, y = c.xs[None, :], c.ys[:, None]
    mid = a.fat_mm + 0.5 * a.muscle_mm
    ra, rb = a.body_radii[0] - mid, a.body_radii[1] - mid
    near_wall = np.abs(np.hypot(x / ra, y / rb) - 1.0) * np.sqrt(ra * rb) < 5.5
    phi = np.abs(np.arctan2(y / rb, x / ra) + np.pi / 2)
    phi = np.where(phi > np.pi, 2 * np.pi - phi, phi)  # angle from the posterior midline
    rows, cols = np.nonzero(near_wall & (phi > 0.45) & (phi < 2.3))
    if rows.size == 0:
        return
    descent = 38.0 * phi[rows, cols]
    for level in a.rib_levels:
        hit_z, hit_p = np.nonzero(np.abs(c.zs[:, None] - (level - descent[None, :])) < 4.5)
        c.tissue[hit_z, rows[hit_p], cols[hit_p]] = Tissue.BONE
        c.hu[hit_z, rows[hit_p], cols[hit_p]] = c.lut[Tissue.BONE]
