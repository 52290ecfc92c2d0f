"""Measurements for disease monitoring from a label volume and its affine.

Liver volume, tumour burden, and per lesion: volume, longest axial diameter (RECIST
style: the longest in-plane extent on any axial slice, edge to edge) and centroid in
RAS+ world millimetres (NIfTI's frame; negate x and y for DICOM's LPS).
"""

from __future__ import annotations

from typing import Any

import cc3d
import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist

from liverpipe.geometry import to_canonical, voxel_spacing, world_of_indices
from liverpipe.labels import Label

__all__ = ["longest_axial_diameter", "measure"]

_CORNERS = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
#: Up to this many corner points (4 pixels), all pairs are cheaper than a convex hull.
_HULL_ABOVE = 16


def longest_axial_diameter(mask_zyx: np.ndarray, spacing_xy: tuple[float, float]) -> float:
    """Longest edge-to-edge in-plane distance (mm) over the axial slices of a (Z, Y, X) mask."""
    best = 0.0
    scale = np.array([spacing_xy[1], spacing_xy[0]])  # (y, x) mm per pixel
    for z in np.flatnonzero(mask_zyx.any(axis=(1, 2))):
        pixels = np.argwhere(mask_zyx[z]).astype(np.float64)
        points = ((pixels[:, None, :] + _CORNERS[None]) * scale).reshape(-1, 2)
        if len(points) > _HULL_ABOVE:
            try:
                points = points[ConvexHull(points).vertices]
            except QhullError:  # collinear pixels: every corner is kept
                pass
        best = max(best, float(pdist(points).max()))
    return best


def measure(labels: np.ndarray, affine: np.ndarray) -> dict[str, Any]:
    """Liver volume (mL), tumour burden and lesion list of a file-order label volume."""
    canonical, geometry = to_canonical(np.asarray(labels), affine)
    canon_affine = geometry.canonical_affine
    spacing = voxel_spacing(canon_affine)  # (x, y, z) mm
    voxel_ml = float(abs(np.linalg.det(canon_affine[:3, :3]))) / 1000.0
    liver_ml = float(np.count_nonzero(canonical >= Label.LIVER)) * voxel_ml
    tumour = np.ascontiguousarray(canonical == Label.TUMOUR)
    components, count = cc3d.connected_components(tumour, connectivity=26, return_N=True)
    lesions: list[dict[str, Any]] = []
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        own = components[box] == index
        zyx = np.argwhere(own) + [s.start for s in box]
        centroid = world_of_indices(canon_affine, zyx.mean(axis=0)[::-1][None])[0]
        lesions.append(
            {
                "id": index,
                "volume_ml": float(own.sum()) * voxel_ml,
                "longest_axial_diameter_mm": longest_axial_diameter(
                    own, (float(spacing[0]), float(spacing[1]))
                ),
                "centroid_ras_mm": [round(float(v), 2) for v in centroid],
            }
        )
    lesions.sort(key=lambda lesion: -lesion["volume_ml"])
    tumour_ml = float(sum(lesion["volume_ml"] for lesion in lesions))
    return {
        "liver_volume_ml": liver_ml,
        "tumour_volume_ml": tumour_ml,
        "tumour_count": int(count),
        "tumour_burden_percent": 100.0 * tumour_ml / liver_ml if liver_ml else 0.0,
        "lesions": lesions,
        "frame": "RAS+ mm (NIfTI world coordinates); liver includes tumour",
    }
