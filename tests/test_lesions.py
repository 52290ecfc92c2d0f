"""Synthetic lesions in stage 2's training crops: geometry, contrast, the liver's bounds,
determinism, and the RoiSource wiring."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

from liverpipe.settings import TumourAugmentConfig, load_settings
from liverpipe.train import (
    Lesion,
    RoiSource,
    SliceSampler,
    draw_lesions,
    implant_lesions,
    stage_table,
)
from storage import SliceStore

CPU = torch.device("cpu")
SPACING = (2.0, 2.0, 3.0)  # (x, y, z) mm
HU_GAIN = 1 / 75  # liver-relative units per HU (relative_window_hu 75)


def _sphere(diameter: float, contrast: float, centre_yx: tuple[float, float], rim: float = 0.0):
    return Lesion(
        centre=(0.0, centre_yx[0] * SPACING[1], centre_yx[1] * SPACING[0]),
        radii=(diameter / 2,) * 3,
        rotation=np.eye(3),
        contrast_hu=contrast,
        rim_hu=rim,
        rim_mm=3.0,
        warp=np.zeros((3, 5)),
    )


def test_a_sphere_darkens_the_liver_by_its_contrast_and_is_labelled_by_its_area() -> None:
    image = torch.zeros(3, 64, 64)
    labels = torch.ones(3, 64, 64, dtype=torch.long)
    out, centre = implant_lesions(
        image, labels, [_sphere(20.0, 30.0, (32, 32))], SPACING, HU_GAIN, clip=True
    )
    area = int((centre == 2).sum())
    expected = math.pi * 10.0**2 / (SPACING[0] * SPACING[1])  # the centre slice's disc
    assert abs(area - expected) / expected < 0.1
    assert float(out[1, 32, 32]) == pytest.approx(-30 * HU_GAIN)  # its core: 30 HU darker
    assert float(out[1, 5, 5]) == 0.0  # far away: untouched
    # The neighbouring slices (3 mm off) cut it smaller but still darken.
    assert float(out[0, 32, 32]) == pytest.approx(-30 * HU_GAIN)
    assert int((out[0] < 0).sum()) <= int((out[1] < 0).sum())


def test_a_lesion_stays_inside_the_liver_and_keeps_the_image_texture() -> None:
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.normal(0, 0.1, (3, 64, 64)).astype(np.float32))
    labels = torch.zeros(3, 64, 64, dtype=torch.long)
    labels[:, :, :32] = 1  # liver on the left half only
    out, centre = implant_lesions(
        image, labels, [_sphere(40.0, 20.0, (32, 32))], SPACING, HU_GAIN, clip=False
    )
    assert torch.equal(out[:, :, 32:], image[:, :, 32:])  # outside the liver: unchanged
    assert not (centre[:, 32:] == 2).any() and (centre[:, :32] == 2).any()
    changed = (out - image)[:, 30:34, 24:30]
    assert torch.allclose(changed, torch.full_like(changed, -20 * HU_GAIN))  # additive
    assert set(centre.unique().tolist()) == {0, 1, 2}


def test_a_rim_is_brighter_than_the_liver_and_labelled_tumour() -> None:
    image = torch.zeros(1, 64, 64)
    labels = torch.ones(1, 64, 64, dtype=torch.long)
    lesion = _sphere(24.0, 25.0, (32, 32), rim=30.0)
    out, centre = implant_lesions(image, labels, [lesion], SPACING, HU_GAIN, clip=True)
    row = out[0, 32]
    assert float(row[32]) == pytest.approx(-25 * HU_GAIN)  # the core
    assert float(row.max()) == pytest.approx(30 * HU_GAIN)  # the rim, 10.5 mm out
    rim = row > 0
    assert rim.any() and (centre[32][rim] == 2).all()


def test_clipping_keeps_the_input_window() -> None:
    image = torch.full((3, 32, 32), -0.95)
    labels = torch.ones(3, 32, 32, dtype=torch.long)
    out, _ = implant_lesions(
        image, labels, [_sphere(30.0, 45.0, (16, 16))], SPACING, HU_GAIN, clip=True
    )
    assert float(out.min()) == -1.0


def test_draws_are_seeded_bounded_and_need_liver() -> None:
    cfg = TumourAugmentConfig(lesions=1.0, lesion_count=(2, 4), lesion_diameter_mm=(5.0, 30.0))
    liver = np.argwhere(np.ones((40, 40), bool))
    a = draw_lesions(np.random.default_rng(5), liver, liver[:0], SPACING, cfg)
    b = draw_lesions(np.random.default_rng(5), liver, liver[:0], SPACING, cfg)
    assert [x.centre for x in a] == [x.centre for x in b] and 2 <= len(a) <= 4
    many = [
        lesion
        for seed in range(200)
        for lesion in draw_lesions(np.random.default_rng(seed), liver, liver[:0], SPACING, cfg)
    ]
    diameters = np.array([2 * np.mean(x.radii) for x in many])
    assert diameters.min() >= 5.0 * 0.75 - 1e-6 and diameters.max() <= 30.0 * 1.25 + 1e-6
    assert all(10.0 <= x.contrast_hu <= 45.0 for x in many)
    assert all(0 <= x.centre[1] <= 39 * SPACING[1] for x in many)  # centred on liver
    assert not draw_lesions(np.random.default_rng(0), liver[:0], liver[:0], SPACING, cfg)
    edge = liver[liver[:, 0] == 0]  # say the liver's surface is its first row
    border = cfg.model_copy(update={"lesion_border": 1.0})
    on_edge = draw_lesions(np.random.default_rng(1), liver, edge, SPACING, border)
    assert on_edge and all(x.centre[1] == 0.0 for x in on_edge)
    off = cfg.model_copy(update={"lesions": 0.0})
    assert not draw_lesions(np.random.default_rng(0), liver, liver[:0], SPACING, off)


def test_invalid_lesion_ranges_are_refused() -> None:
    with pytest.raises(ValueError, match="lesion_count"):
        TumourAugmentConfig(lesion_count=(3, 1))
    with pytest.raises(ValueError, match="lesion_diameter_mm"):
        TumourAugmentConfig(lesion_diameter_mm=(0.0, 10.0))


def test_roi_crops_get_synthetic_lesions_only_when_asked(tiny_store: Path) -> None:
    store = SliceStore.open(tiny_store)
    tiny = load_settings(REPO / "configs" / "tiny.toml").tumour

    def batch(lesions: float) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = tiny.model_copy(
            update={"augment": tiny.augment.model_copy(update={"lesions": lesions})}
        )
        table, prepared = stage_table(store, store.cases("train"), cfg, CPU)
        sampler = SliceSampler(table, (0.0, 0.0), 1)  # no crop centred on real tumour
        source = RoiSource(store, table, cfg, CPU, sampler.rng, prepared)
        return source.batch(sampler.draw(32))

    plain_images, plain_labels = batch(0.0)
    again_images, again_labels = batch(0.0)
    assert torch.equal(plain_images, again_images) and torch.equal(plain_labels, again_labels)
    _, labels = batch(1.0)  # other crops (the lesions draw from the same generator)
    with_tumour = (labels == 2).flatten(1).any(1).float().mean()
    assert with_tumour > (plain_labels == 2).flatten(1).any(1).float().mean()
    assert with_tumour > 0.5  # every crop with liver on its centre slice got one
