"""Canonical (Z, Y, X) geometry: any axis flip or permutation gives the same array and
affine, the inverse is exact, and every voxel keeps its world position."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from liverpipe.geometry import (
    CanonicalGeometry,
    axis_codes,
    from_canonical,
    to_canonical,
    voxel_spacing,
    world_of_indices,
)
from liverpipe.io import read_header, read_voxels

permutations = st.permutations([0, 1, 2])
flips = st.tuples(*[st.sampled_from([1, -1])] * 3)
shapes = st.tuples(*[st.integers(1, 6)] * 3)
spacings = st.tuples(*[st.floats(0.3, 5.0)] * 3)


def _rotation(angle_deg: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])


def _affine(
    spacing: tuple[float, float, float], angle: float, origin: tuple[float, float, float]
) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = _rotation(angle) @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


@settings(max_examples=60, deadline=None)
@given(
    shape=shapes,
    spacing=spacings,
    angle=st.floats(-30.0, 30.0),
    perm=permutations,
    flip=flips,
)
def test_any_storage_order_canonicalises_to_the_same_grid(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    angle: float,
    perm: list[int],
    flip: tuple[int, int, int],
) -> None:
    data = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
    reference = nib.Nifti1Image(data, _affine(spacing, angle, (-10.0, 20.0, 30.0)))
    ornt = np.array([[p, f] for p, f in zip(perm, flip, strict=True)], dtype=float)
    stored = reference.as_reoriented(ornt)
    stored_data = np.asarray(stored.dataobj)

    canon_ref, geo_ref = to_canonical(data, reference.affine)
    canon, geo = to_canonical(stored_data, stored.affine)

    np.testing.assert_array_equal(canon, canon_ref)
    np.testing.assert_allclose(geo.canonical_affine, geo_ref.canonical_affine, atol=1e-9)
    back = from_canonical(canon, geo)
    assert back.shape == stored_data.shape
    np.testing.assert_array_equal(back, stored_data)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, spacing=spacings, angle=st.floats(-40.0, 40.0), perm=permutations, flip=flips)
def test_every_voxel_keeps_its_world_position(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    angle: float,
    perm: list[int],
    flip: tuple[int, int, int],
) -> None:
    ornt = np.array([[p, f] for p, f in zip(perm, flip, strict=True)], dtype=float)
    image = nib.Nifti1Image(
        np.arange(np.prod(shape), dtype=np.int32).reshape(shape),
        _affine(spacing, angle, (5.0, -7.0, 100.0)),
    ).as_reoriented(ornt)
    data = np.asarray(image.dataobj)
    canon, geo = to_canonical(data, image.affine)
    ijk = np.argwhere(np.ones(data.shape, dtype=bool))
    world_file = world_of_indices(image.affine, ijk)
    zyx = np.array([np.argwhere(canon == data[tuple(v)])[0] for v in ijk])
    world_canon = world_of_indices(geo.canonical_affine, zyx[:, ::-1])
    np.testing.assert_allclose(world_canon, world_file, atol=1e-9)


def test_canonical_axes_point_right_anterior_superior() -> None:
    lps = np.diag([-0.8, -0.8, 2.5, 1.0])
    _, geo = to_canonical(np.zeros((4, 5, 6)), lps)
    assert nib.aff2axcodes(geo.canonical_affine) == ("R", "A", "S")
    assert geo.canonical_shape == (6, 5, 4)


def test_oblique_scan_keeps_its_obliquity_in_the_affine() -> None:
    affine = _affine((0.7, 0.7, 3.0), 25.0, (0.0, 0.0, 0.0))
    canon, geo = to_canonical(np.arange(60).reshape(3, 4, 5), affine)
    # Only flips and permutations: the direction cosines stay 25 degrees off the axes.
    column = geo.canonical_affine[:3, 0] / np.linalg.norm(geo.canonical_affine[:3, 0])
    assert np.isclose(abs(column[0]), np.cos(np.deg2rad(25.0)))
    assert canon.shape == geo.canonical_shape


def test_from_canonical_refuses_a_foreign_grid() -> None:
    geo = CanonicalGeometry.of((4, 5, 6), np.eye(4))
    try:
        from_canonical(np.zeros((6, 5, 5)), geo)
    except ValueError as err:
        assert "does not match the canonical grid (6, 5, 4)" in str(err)
    else:
        raise AssertionError("a wrong-shaped array was accepted")


def test_real_ct_geometry_and_liver_hu(real_ct: tuple[Path, Path]) -> None:
    ct_path, liver_path = real_ct
    ct, liver = read_header(ct_path), read_header(liver_path)
    assert ct.shape == (122, 101, 30)
    np.testing.assert_allclose(ct.spacing, (3.0, 3.0, 3.0), atol=1e-4)
    assert ct.axcodes == ("R", "A", "S")
    hu, geo = to_canonical(read_voxels(ct), ct.affine)
    mask, geo_mask = to_canonical(read_voxels(liver), liver.affine)
    assert hu.shape == (30, 101, 122)
    np.testing.assert_allclose(geo.canonical_affine, geo_mask.canonical_affine)
    assert int((mask == 1).sum()) == 38634
    assert abs(float(np.median(hu[mask == 1])) - 46.0) <= 5.0
    # The inverse reproduces the file's voxel order exactly.
    np.testing.assert_array_equal(from_canonical(hu, geo), read_voxels(ct))


def test_spacing_and_orientation_come_from_one_helper_and_hold_for_oblique_scans() -> None:
    """Voxel size is the length of each affine column: for a scan tilted 30 degrees, the
    sum of absolute entries (the old preview formula) is wrong by up to 37 %."""
    angle = np.deg2rad(30)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-0.7, 0.9, 2.5])  # x flipped: left-pointing
    assert np.allclose(voxel_spacing(affine), [0.7, 0.9, 2.5])
    assert not np.allclose(np.abs(affine[:3, :3]).sum(axis=0), [0.7, 0.9, 2.5], rtol=0.3)
    assert axis_codes(affine) == "LAS"
    # the canonical grid (RAS order, x reversed) keeps the voxel sizes, axis by axis
    data = np.zeros((4, 5, 6), np.int16)
    canonical, geometry = to_canonical(data, affine)
    assert canonical.shape == (6, 5, 4)
    assert np.allclose(geometry.spacing, [0.7, 0.9, 2.5])
    assert axis_codes(geometry.canonical_affine) == "RAS"
    permuted = affine[:, [2, 0, 1, 3]]  # file axes (z, x, y): spacing follows the axes
    assert np.allclose(voxel_spacing(permuted), [2.5, 0.7, 0.9])
    assert np.allclose(CanonicalGeometry.of((6, 4, 5), permuted).spacing, [0.7, 0.9, 2.5])
