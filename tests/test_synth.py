"""Phantoms: valid labels, tumour inside liver, CT-like HU per tissue, variety, determinism."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from liverpipe.cli import app
from liverpipe.geometry import to_canonical
from liverpipe.io import read_header, read_voxels
from liverpipe.labels import Label
from liverpipe.synth import Tissue, generate_dataset, label_of, render_case
from liverpipe.synth.phantom import plan_case

runner = CliRunner()


def _interior(mask: np.ndarray) -> np.ndarray:
    """Voxels two in-plane steps away from the tissue border (no partial volume)."""
    return ndimage.binary_erosion(mask, structure=np.ones((1, 3, 3)), iterations=2)


@pytest.fixture(scope="module")
def small_cases() -> list:
    return [render_case(0, i, "small") for i in range(4)]


@pytest.fixture(scope="module")
def full_case():
    """A full-size (512x512) case with at least one tumour and few slices, to stay quick."""
    index = next(
        i
        for i in range(60)
        if plan_case(7, i, "full")[1].shape[0] <= 60
        and len(plan_case(7, i, "full")[0].tumours) >= 2
    )
    return render_case(7, index, "full")


def test_labels_are_valid_and_tumour_lies_inside_the_liver(small_cases: list) -> None:
    for case in small_cases:
        assert set(np.unique(case.label)) <= {0, 1, 2}
        assert (case.label == Label.LIVER).sum() > 1000
        zyx = np.argwhere(case.label == Label.TUMOUR)
        if len(zyx) == 0:
            continue
        # Independently of the label map: every tumour voxel centre lies inside the liver surface.
        world_patient = zyx[:, ::-1] * np.array(case.acquisition.spacing) + np.array(
            case.acquisition.origin
        )
        assert (case.anatomy.liver_sdf_points(world_patient) < 0).all()


def test_labels_agree_exactly_with_the_rendered_tissue(small_cases: list) -> None:
    for case in small_cases:
        np.testing.assert_array_equal(case.label, label_of(case.tissue))


def test_liver_is_lobed_not_an_ellipsoid(small_cases: list) -> None:
    for case in small_cases:
        mask = case.label > 0
        pts = np.argwhere(mask) * np.array(case.acquisition.spacing[::-1])
        mu, inv = pts.mean(0), np.linalg.inv(np.cov((pts - pts.mean(0)).T))
        grid = (
            np.argwhere(np.ones(mask.shape, bool)) * np.array(case.acquisition.spacing[::-1]) - mu
        )
        ellipsoid = (np.einsum("ij,jk,ik->i", grid, inv, grid) <= 5.0).reshape(mask.shape)
        dice = 2 * (ellipsoid & mask).sum() / (ellipsoid.sum() + mask.sum())
        assert dice < 0.93, f"{case.case_id}: liver is too close to an ellipsoid (Dice {dice:.3f})"


def test_full_size_hu_statistics_per_tissue(full_case) -> None:
    c = full_case
    assert c.hu.shape[1:] == (512, 512)
    dx, _, dz = c.acquisition.spacing
    assert 0.6 <= dx <= 1.0 and 0.7 <= dz <= 5.0
    median = {
        t: float(np.median(c.hu[_interior(c.tissue == t)]))
        for t in Tissue
        if _interior(c.tissue == t).any()
    }
    assert -120 <= median[Tissue.FAT] <= -80
    assert 40 <= median[Tissue.MUSCLE] <= 60
    assert 50 <= median[Tissue.LIVER] <= 70
    assert 150 <= median[Tissue.AORTA] <= 200
    bone = _interior(np.isin(c.tissue, (Tissue.BONE, Tissue.MARROW)))
    assert 400 <= float(np.median(c.hu[bone])) <= 1000
    assert median[Tissue.STOMACH_GAS] < -900 and median[Tissue.LUNG] < -700
    # Tumours are hypodense: 10-40 HU below the liver, measured lesion by lesion.
    lesions, n = ndimage.label(_interior(c.tissue == Tissue.TUMOUR))
    assert n >= 1
    for k in range(1, n + 1):
        delta = float(np.median(c.hu[lesions == k])) - median[Tissue.LIVER]
        assert -42 <= delta <= -8, f"lesion {k} is {delta:+.1f} HU from the liver"
    # Noise: the stated sigma, measured where nothing else varies (air outside the body).
    air = _interior(c.tissue == Tissue.AIR)
    assert 8 <= float(c.hu[air].std()) <= 20
    assert abs(float(c.hu[air].std()) - c.acquisition.noise_sigma) < 1.0


def test_noise_is_spatially_correlated(full_case) -> None:
    air = full_case.hu[:, :40, :40] + 1000.0  # a corner of air: pure noise
    lag1 = np.corrcoef(air[:, :, :-1].ravel(), air[:, :, 1:].ravel())[0, 1]
    assert 0.3 < lag1 < 0.9


def test_partial_volume_gives_intermediate_values_at_borders() -> None:
    case = render_case(3, 1, "small", noise=False)
    border = ndimage.binary_dilation(case.tissue == Tissue.AIR) & (case.tissue == Tissue.FAT)
    values = case.hu[border]
    fat = np.median(case.hu[_interior(case.tissue == Tissue.FAT)])
    assert ((values > -990) & (values < fat - 30)).mean() > 0.2  # mixed air/fat voxels


def test_cases_vary_in_geometry_encoding_and_lesions() -> None:
    plans = [plan_case(0, i, "full") for i in range(40)]
    acqs = [a for _, a in plans]
    assert len({a.orientation for a in acqs}) >= 5
    assert {a.image_dtype for a in acqs} == {"int16", "uint16", "float32"}
    assert {a.compressed for a in acqs} == {True, False}
    assert min(a.shape[0] for a in acqs) == 40 and max(a.shape[0] for a in acqs) > 200
    assert min(a.spacing[0] for a in acqs) < 0.75 and max(a.spacing[0] for a in acqs) > 0.9
    counts = Counter(len(an.tumours) for an, _ in plans)
    assert counts[0] > 0 and max(counts) >= 4
    diameters = [2 * t.radii.mean() for an, _ in plans for t in an.tumours]
    assert min(diameters) < 10 and max(diameters) > 35
    assert any(t.rim_hu is not None for an, _ in plans for t in an.tumours)
    assert len({round(an.body_radii[0]) for an, _ in plans}) > 20


def test_written_files_read_back_onto_the_rendered_anatomy(phantom_dir: Path) -> None:
    for i, image_path in enumerate(sorted((phantom_dir / "imagesTr").iterdir())):
        case = render_case(0, i, "small")
        image = read_header(image_path)
        label = read_header(phantom_dir / "labelsTr" / image_path.name)
        assert "".join(image.axcodes) == case.acquisition.orientation
        hu, geo = to_canonical(read_voxels(image), image.affine)
        lab, _ = to_canonical(read_voxels(label), label.affine)
        np.testing.assert_allclose(geo.canonical_affine, case.affine, atol=1e-4)
        np.testing.assert_array_equal(lab, case.label)
        quantum = {"int16": 0.5, "uint16": case.acquisition.uint16_slope / 2, "float32": 1e-3}
        inside = case.hu > -1024  # int16 and uint16 clip air noise at -1024
        assert np.abs(hu - case.hu)[inside].max() <= quantum[case.acquisition.image_dtype] + 1e-3


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    def digest(root: Path) -> dict[str, str]:
        return {
            p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    generate_dataset(tmp_path / "a", 2, seed=5)
    generate_dataset(tmp_path / "b", 2, seed=5, workers=2)
    generate_dataset(tmp_path / "c", 2, seed=6)
    a, b, c = digest(tmp_path / "a"), digest(tmp_path / "b"), digest(tmp_path / "c")
    assert a == b  # byte-identical, whatever the number of workers
    assert a != c


def test_synth_cli_with_preview(tmp_path: Path) -> None:
    out = tmp_path / "ph"
    result = runner.invoke(app, ["synth", str(out), "--cases", "2", "--seed", "3", "--preview"])
    assert result.exit_code == 0, result.output
    png = out / "preview.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (
        len(list((out / "imagesTr").iterdir())) == 2
        and len(list((out / "labelsTr").iterdir())) == 2
    )


def test_field_kernels_in_place_give_the_bits_of_their_formulas() -> None:
    """smooth_min and ellipsoid_sdf work in place (fewer volume-sized temporaries: the
    phantoms render about a fifth faster), and must give exactly the bits of their
    textbook formulas, so that phantoms of a seed stay byte-identical."""
    from liverpipe.synth._fields import ellipsoid_sdf, smooth_min

    rng = np.random.default_rng(5)
    x = rng.uniform(-90, 90, (1, 1, 37))
    y = rng.uniform(-90, 90, (1, 23, 1))
    z = rng.uniform(-60, 60, (11, 1, 1))
    centre, radii = np.array([3.0, -7.5, 12.0]), np.array([71.0, 55.5, 40.25])
    q = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
    q = q + ((z - centre[2]) / radii[2]) ** 2
    expected_sdf = (np.sqrt(q) - 1.0) * float(np.min(radii))
    got_sdf = ellipsoid_sdf(x, y, z, centre, radii)
    assert got_sdf.shape == (11, 23, 37)
    np.testing.assert_array_equal(got_sdf, expected_sdf)

    a = got_sdf
    b = ellipsoid_sdf(x, y, z, centre + 30.0, radii * 0.7)
    for k in (18.0, 0.3, 250.0):
        h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
        expected = b + (a - b) * h - k * h * (1.0 - h)
        a_before, b_before = a.copy(), b.copy()
        np.testing.assert_array_equal(smooth_min(a, b, k), expected)
        np.testing.assert_array_equal(a, a_before)  # the inputs are left as they were
        np.testing.assert_array_equal(b, b_before)
