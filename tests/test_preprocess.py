"""Preprocessing into the store: geometry on real CT, orientation invariance, small
tumours, incremental reruns, bad cases, quantisation error and z-score mode."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, ct_volume, write_nifti

from liverpipe.geometry import world_of_indices
from liverpipe.io import read_header, read_voxels
from liverpipe.preprocess import assign_split, assign_splits, preprocess_dataset, serial_runner
from liverpipe.settings import Settings, load_settings
from storage import SliceStore

TINY = REPO / "configs" / "tiny.toml"


def _settings(**preprocess: object) -> Settings:
    return load_settings(TINY, {"preprocess": preprocess})


def _real_dataset(root: Path, real_ct: tuple[Path, Path], orientation: str | None = None) -> Path:
    ct, liver = (nib.load(p) for p in real_ct)
    for sub, source in (("imagesTr", ct), ("labelsTr", liver)):
        image = source
        if orientation is not None:
            target = nib.orientations.axcodes2ornt(tuple(orientation))
            image = source.as_reoriented(
                nib.orientations.ornt_transform(
                    nib.orientations.io_orientation(image.affine), target
                )
            )
        (root / sub).mkdir(parents=True, exist_ok=True)
        nib.save(image, root / sub / "realct.nii.gz")
    return root


def test_real_ct_volume_and_centroid_survive_preprocessing(
    tmp_path: Path, real_ct: tuple[Path, Path]
) -> None:
    data = _real_dataset(tmp_path / "data", real_ct)
    settings = _settings(target_spacing=(1.0, 1.0, 2.5), slice_size=(384, 384))
    summary = preprocess_dataset(data, tmp_path / "s.zarr", settings, serial_runner)
    assert summary.processed == ["realct"] and summary.ok
    case = SliceStore.open(tmp_path / "s.zarr").case("realct")
    _, label = case.load()
    mask_info = read_header(real_ct[1])
    mask = read_voxels(mask_info) > 0
    source_mm3 = mask.sum() * np.prod(mask_info.spacing)
    stored_mm3 = (label > 0).sum() * np.prod(case.meta.spacing)
    assert abs(stored_mm3 / source_mm3 - 1) < 0.03
    source_centroid = world_of_indices(mask_info.affine, np.argwhere(mask).mean(axis=0))
    stored_centroid = world_of_indices(
        case.meta.affine_array, np.argwhere(label > 0).mean(axis=0)[::-1]
    )
    assert np.linalg.norm(source_centroid - stored_centroid) < 0.5 * max(case.meta.spacing)
    # Intensities: the stored liver is soft tissue (window -200..250 -> ~0.55 for 46 HU).
    image, _ = case.load()
    liver_hu = (
        np.median(image[label > 0].astype(np.float32)) * case.meta.intensity.hu_scale
        + case.meta.intensity.hu_offset
    )
    assert 30 < liver_hu < 65
    assert case.meta.shape == (36, 384, 384)


def test_lps_copy_gives_identical_store(tmp_path: Path, real_ct: tuple[Path, Path]) -> None:
    stores = {}
    for code in ("RAS", "LPS", "PIL"):
        data = _real_dataset(tmp_path / code, real_ct, code)
        assert (
            "".join(nib.aff2axcodes(nib.load(data / "imagesTr" / "realct.nii.gz").affine)) == code
        )
        preprocess_dataset(data, tmp_path / f"{code}.zarr", _settings(), serial_runner)
        stores[code] = SliceStore.open(tmp_path / f"{code}.zarr").case("realct")
    ref_image, ref_label = stores["RAS"].load()
    for code in ("LPS", "PIL"):
        image, label = stores[code].load()
        np.testing.assert_array_equal(image, ref_image)
        np.testing.assert_array_equal(label, ref_label)
        np.testing.assert_allclose(
            stores[code].meta.affine_array, stores["RAS"].meta.affine_array, atol=1e-9
        )


@pytest.mark.parametrize("interpolation", ["label_linear", "nearest"])
def test_a_5mm_tumour_survives_resampling(tmp_path: Path, interpolation: str) -> None:
    spacing = np.array([0.7, 0.7, 0.8])
    shape = (160, 160, 120)
    grid = np.stack(
        np.meshgrid(
            *[np.arange(n) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij"
        ),
        -1,
    )
    centre = np.array(shape) * spacing / 2 + np.array([3.3, -2.1, 1.7])  # off the target grid
    distance = np.linalg.norm(grid - centre, axis=-1)
    label = np.where(distance < 30, 1, 0).astype(np.uint8)
    label[distance < 2.5] = 2  # a 5 mm tumour
    image = np.where(label > 0, 60, -100).astype(np.int16)
    affine = np.diag([*spacing, 1.0])
    write_nifti(tmp_path / "d" / "imagesTr" / "t.nii.gz", image, affine)
    write_nifti(tmp_path / "d" / "labelsTr" / "t.nii.gz", label, affine)
    settings = _settings(
        target_spacing=(1.0, 1.0, 2.5), slice_size=(128, 128), label_interpolation=interpolation
    )
    preprocess_dataset(tmp_path / "d", tmp_path / "s.zarr", settings, serial_runner)
    case = SliceStore.open(tmp_path / "s.zarr").case("t")
    _, stored = case.load()
    tumour_mm3 = (stored == 2).sum() * np.prod(case.meta.spacing)
    sphere_mm3 = 4 / 3 * np.pi * 2.5**3
    assert tumour_mm3 > 0.4 * sphere_mm3, (
        f"{interpolation}: {tumour_mm3:.0f} of {sphere_mm3:.0f} mm3 kept"
    )
    assert sum(case.meta.slice_counts["tumour"]) == (stored == 2).sum()


def test_incremental_reruns(tmp_path: Path, phantom_dir: Path) -> None:
    data = Path(shutil.copytree(phantom_dir, tmp_path / "data"))
    store_path = tmp_path / "s.zarr"
    first = preprocess_dataset(data, store_path, _settings(), serial_runner)
    assert len(first.processed) == 4 and first.skipped == []
    second = preprocess_dataset(data, store_path, _settings(), serial_runner)
    assert second.processed == [] and len(second.skipped) == 4
    # Change one label's content (same path, same size): only that case reruns.
    label_path = sorted((data / "labelsTr").iterdir())[1]
    info = read_header(label_path)
    changed = read_voxels(info).copy()
    changed[changed.shape[0] // 2, changed.shape[1] // 2, :] = 0
    image = nib.Nifti1Image(changed.astype(info.disk_dtype), info.affine, info.header)
    nib.save(image, label_path)
    third = preprocess_dataset(data, store_path, _settings(), serial_runner)
    assert third.processed == [label_path.name.split(".")[0]] and len(third.skipped) == 3
    # A config change reprocesses everything.
    fourth = preprocess_dataset(
        data, store_path, _settings(hu_window=(-150.0, 250.0)), serial_runner
    )
    assert len(fourth.processed) == 4
    # A vanished source stays in the store and is reported, never deleted.
    gone = sorted((data / "imagesTr").iterdir())[0]
    gone_id = gone.name.split(".")[0]
    gone.unlink()
    (data / "dataset.json").unlink()
    fifth = preprocess_dataset(
        data, store_path, _settings(hu_window=(-150.0, 250.0)), serial_runner
    )
    assert gone_id in fifth.missing
    store = SliceStore.open(store_path)
    assert gone_id in store.cases() and store.manifest.entries[gone_id].source_missing
    assert store.case(gone_id).load()[0].size > 0


def test_bad_cases_are_recorded_and_good_ones_stored(tmp_path: Path, phantom_dir: Path) -> None:
    data = Path(shutil.copytree(phantom_dir, tmp_path / "data"))
    (data / "dataset.json").unlink()
    write_nifti(data / "imagesTr" / "badlabel.nii.gz", ct_volume((8, 8, 8)))
    write_nifti(data / "labelsTr" / "badlabel.nii.gz", np.full((8, 8, 8), 7, np.uint8))
    write_nifti(data / "imagesTr" / "nolabel.nii.gz", np.zeros((8, 8, 8), np.int16))
    summary = preprocess_dataset(data, tmp_path / "s.zarr", _settings(), serial_runner)
    assert not summary.ok and len(summary.processed) == 4
    assert "found 7" in summary.failed["badlabel"] and "Fix:" in summary.failed["badlabel"]
    assert "without a label" in summary.failed["nolabel"]
    store = SliceStore.open(tmp_path / "s.zarr")
    assert len(store.cases()) == 4
    entries = store.manifest.entries
    assert entries["badlabel"].status == "failed" and "found 7" in (entries["badlabel"].error or "")


@pytest.mark.parametrize(
    ("dtype", "bound_hu"), [("float16", 0.25), ("uint8", 450 / 255 / 2 + 1e-3)]
)
def test_storage_dtype_error_is_bounded(phantom_dir: Path, dtype: str, bound_hu: float) -> None:
    """Decoding a stored image gives the windowed HU back within half a quantisation step."""
    from liverpipe.geometry import CanonicalGeometry
    from liverpipe.preprocess.kernels import (
        AIR_HU,
        body_centre,
        canonical_view,
        encode,
        normalize_ct,
        resample_to_grid,
        stored_grid,
    )

    cfg = _settings(storage_dtype=dtype).preprocess
    info = read_header(sorted((phantom_dir / "imagesTr").iterdir())[0])
    geometry = CanonicalGeometry.of(info.shape, info.affine)
    canonical = canonical_view(read_voxels(info), geometry)
    grid = stored_grid(geometry, body_centre(canonical, cfg.body_threshold_hu), cfg)
    hu = resample_to_grid(canonical, geometry.canonical_affine, grid, "linear", AIR_HU)
    reference = np.clip(hu, -200.0, 250.0).astype(np.float64)
    stored, scale, offset = encode(normalize_ct(hu.copy(), cfg.hu_window), dtype, (0.0, 1.0))
    assert stored.dtype == np.dtype(dtype)
    decoded = (stored.astype(np.float64) * scale + offset) * 450.0 - 200.0
    assert np.abs(decoded - reference).max() <= bound_hu


def test_zscore_normalisation_uses_train_foreground_statistics(
    tmp_path: Path, phantom_dir: Path
) -> None:
    settings = _settings(normalization="zscore")
    store_path = tmp_path / "s.zarr"
    preprocess_dataset(phantom_dir, store_path, settings, serial_runner)
    store = SliceStore.open(store_path)
    stats = store.meta.config["zscore"]
    assert 40 < stats["mean"] < 75 and stats["low"] < stats["mean"] < stats["high"]
    image, label = store.case(store.cases()[0]).load()
    liver = image[label == 1].astype(np.float32)
    assert abs(float(np.median(liver))) < 1.0  # liver sits near the foreground mean
    again = preprocess_dataset(phantom_dir, store_path, settings, serial_runner)
    assert again.processed == []  # stats reused, config hash unchanged


def test_split_is_deterministic_and_near_the_fractions() -> None:
    ids = [f"liver_{i}" for i in range(2000)]
    splits = [assign_split(c, (0.7, 0.15, 0.15), "liverpipe") for c in ids]
    assert splits == [assign_split(c, (0.7, 0.15, 0.15), "liverpipe") for c in ids]
    share = {s: splits.count(s) / len(ids) for s in ("train", "val", "test")}
    assert abs(share["train"] - 0.7) < 0.03 and abs(share["val"] - 0.15) < 0.03


def _all_train_ids(count: int, fractions: tuple[float, float, float]) -> list[str]:
    """Case ids whose hash split is train, so only the guarantee can fill val and test."""
    ids = (f"case_{i}" for i in range(10_000))
    return [c for c in ids if assign_split(c, fractions, "liverpipe") == "train"][:count]


def test_three_or_more_cases_always_have_a_val_and_a_test_case() -> None:
    fractions = (0.7, 0.15, 0.15)
    ids = _all_train_ids(3, fractions)
    splits = assign_splits(ids, {}, fractions, "liverpipe")
    assert sorted(splits.values()) == ["test", "train", "val"]
    assert assign_splits(ids[:2], {}, fractions, "liverpipe") == dict.fromkeys(ids[:2], "train")
    # Existing cases never move: new ones fill the empty splits, one at a time.
    existing = dict.fromkeys(_all_train_ids(5, fractions), "train")
    more = [c for c in _all_train_ids(8, fractions) if c not in existing]
    first = assign_splits(more[:1], existing, fractions, "liverpipe")
    assert first == {more[0]: "val"}
    second = assign_splits(more[1:2], {**existing, **first}, fractions, "liverpipe")
    assert second == {more[1]: "test"}
    third = assign_splits(more[2:3], {**existing, **first, **second}, fractions, "liverpipe")
    assert third == {more[2]: "train"}  # both filled: the hash decides again
    # A zero fraction is respected.
    no_test = assign_splits(ids, {}, (0.8, 0.2, 0.0), "liverpipe")
    assert sorted(no_test.values()) == ["train", "train", "val"]


def test_splits_are_kept_when_cases_arrive(tmp_path: Path, phantom_dir: Path) -> None:
    """The store's 4 phantoms keep their splits when 2 more arrive, and the guarantee holds."""
    settings = load_settings(REPO / "configs" / "tiny.toml")
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    (data / "dataset.json").unlink()
    store_path = tmp_path / "s.zarr"
    preprocess_dataset(data, store_path, settings, serial_runner)
    before = {e.case_id: e.split for e in SliceStore.open(store_path).manifest.entries.values()}
    assert {"train", "val", "test"} <= set(before.values())
    for name in sorted((data / "imagesTr").iterdir())[:2]:
        for folder in ("imagesTr", "labelsTr"):
            src = data / folder / name.name
            shutil.copy(src, data / folder / f"new_{name.name}")
    preprocess_dataset(data, store_path, settings, serial_runner)
    after = {e.case_id: e.split for e in SliceStore.open(store_path).manifest.entries.values()}
    assert len(after) == 6 and all(after[c] == s for c, s in before.items())


def test_label_resampling_in_the_bounding_box_equals_the_full_grid(phantom_dir: Path) -> None:
    """Resampling each mask only around its support gives the full-grid result exactly."""
    from liverpipe.geometry import CanonicalGeometry
    from liverpipe.preprocess import (
        body_centre,
        canonical_view,
        resample_label,
        resample_to_grid,
        stored_grid,
    )

    cfg = _settings(target_spacing=(2.0, 2.0, 3.0), slice_size=(128, 128)).preprocess
    for image_path in sorted((phantom_dir / "imagesTr").iterdir())[:2]:
        info = read_header(image_path)
        geometry = CanonicalGeometry.of(info.shape, info.affine)
        grid = stored_grid(
            geometry, body_centre(canonical_view(read_voxels(info), geometry), -500), cfg
        )
        labels = np.ascontiguousarray(
            canonical_view(
                read_voxels(read_header(phantom_dir / "labelsTr" / image_path.name)), geometry
            ),
            dtype=np.uint8,
        )
        fast = resample_label(labels, geometry.canonical_affine, grid, "label_linear")
        liver = (
            resample_to_grid(
                (labels >= 1).astype(np.uint8), geometry.canonical_affine, grid, "linear", 0
            )
            >= 0.5
        )
        tumour = (
            resample_to_grid(
                (labels == 2).astype(np.uint8), geometry.canonical_affine, grid, "linear", 0
            )
            >= 0.5
        )
        reference = np.where(tumour, 2, np.where(liver, 1, 0)).astype(np.uint8)
        assert (fast == reference).mean() > 0.99999
        assert (fast > 0).sum() > 1000


@pytest.mark.parametrize("interpolation", ["label_linear", "nearest"])
@pytest.mark.parametrize("z_span", [(0, 6), (3, 9), (14, 20), (0, 20)])
def test_label_crop_first_gives_the_stored_labels_of_the_whole_volume_path(
    interpolation: str, z_span: tuple[int, int]
) -> None:
    """resample_label crops to the labelled voxels before it builds the masks (issue 13:
    memory). The stored labels must equal, voxel for voxel, those of the masks built on
    the whole volume, also when the label touches the first or last slice or an edge."""
    from liverpipe.labels import Label
    from liverpipe.preprocess.kernels import Grid, _resample_in_box, resample_label

    rng = np.random.default_rng(sum(z_span))
    labels = np.zeros((20, 40, 36), dtype=np.uint8)
    z0, z1 = z_span
    labels[z0:z1, 0:17, 9:36] = Label.LIVER  # touches y = 0 and the last x
    labels[z0:z1, 5:9, 20:26] = np.where(rng.random((z1 - z0, 4, 6)) > 0.3, Label.TUMOUR, 1)
    affine = np.diag([0.8, 0.8, 1.25, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 30.0)
    step = np.diag([2.0 / 0.8, 2.0 / 0.8, 2.5 / 1.25, 1.0])
    step[:3, 3] = (0.3, -0.2, 0.25)
    grid = Grid((10, 16, 15), affine @ step, (0, 0, 0))

    def put(threshold: float | None) -> Callable[[np.ndarray, np.ndarray], None]:
        def write(target: np.ndarray, values: np.ndarray) -> None:
            target[...] = values if threshold is None else values >= threshold

        return write

    reference = np.zeros(grid.shape, dtype=np.uint8)  # the masks on the whole volume
    if interpolation == "nearest":
        _resample_in_box(labels, labels > 0, affine, grid, reference, "nearest", write=put(None))
    else:
        liver, tumour = labels >= 1, labels == 2
        _resample_in_box(
            liver.view(np.uint8), liver, affine, grid, reference, "linear", write=put(0.5)
        )
        tumour_out = np.zeros(grid.shape, dtype=np.uint8)  # a whole grid of its own
        _resample_in_box(
            tumour.view(np.uint8), tumour, affine, grid, tumour_out, "linear", write=put(0.5)
        )
        reference[tumour_out > 0] = 2
    got = resample_label(labels, affine, grid, interpolation)
    np.testing.assert_array_equal(got, reference)
    assert (got == 1).any() and (got == 2).any()


@pytest.mark.parametrize("slab", [1, 7, 32, 100])
def test_hu_statistics_match_numpy_on_the_whole_region(slab: int) -> None:
    """The statistics stored with each case, counted from a histogram of the float16
    values, equal numpy's on the whole region: exact counts, and mean, std and
    percentiles (numpy's linear method) to float64 rounding, for a region larger than
    the 200,000 voxels that an earlier version sampled."""
    from liverpipe.preprocess import hu_statistics

    rng = np.random.default_rng(slab)
    hu = rng.normal(-300, 400, (80, 64, 64)).astype(np.float16)
    label = np.zeros(hu.shape, dtype=np.uint8)
    label[10:30, 20:50, 15:45] = 1
    label[18:22, 30:36, 25:31] = 2
    hu[label > 0] = rng.normal(60, 15, int((label > 0).sum())).astype(np.float16)
    stats = hu_statistics(hu, label, -500.0, slab=slab)
    for name, region in (("body", hu > -500), ("liver", label > 0)):
        values = hu[region].astype(np.float64)
        assert stats[f"{name}_voxels"] == values.size
        assert stats[f"{name}_mean"] == pytest.approx(values.mean(), rel=1e-9, abs=1e-9)
        assert stats[f"{name}_std"] == pytest.approx(values.std(), rel=1e-9)
        p005, p50, p995 = np.percentile(values, [0.5, 50, 99.5])
        assert stats[f"{name}_median"] == pytest.approx(p50, rel=1e-12, abs=1e-12)
        assert stats[f"{name}_p0.5"] == pytest.approx(p005, rel=1e-12, abs=1e-12)
        assert stats[f"{name}_p99.5"] == pytest.approx(p995, rel=1e-12, abs=1e-12)
    assert (hu > -500).sum() > 200_000
    assert hu_statistics(hu, np.zeros_like(label), 5000.0, slab=slab) == {}
    with pytest.raises(TypeError, match="float16"):
        hu_statistics(hu.astype(np.float32), label, -500.0)


def test_largest_cases_are_submitted_first(tmp_path: Path) -> None:
    """The plan hands the largest image files to the workers first, so that a small case
    finishes the run (issue 13: a shorter idle tail); equal sizes keep their order."""
    from liverpipe.preprocess import plan
    from liverpipe.preprocess.case import CaseJob
    from liverpipe.preprocess.pipeline import largest_first

    sizes = {"a": 10, "b": 300, "c": 10, "d": 50}
    jobs = [
        CaseJob(
            cid,
            tmp_path / cid,
            None,
            tmp_path,
            Settings().preprocess,
            "h",
            identity={"image": [size, 0, 0, 0]},
        )
        for cid, size in sizes.items()
    ]
    assert [j.case_id for j in largest_first(jobs)] == ["b", "d", "a", "c"]

    data = tmp_path / "data"
    for cid, slices in (("c1", 4), ("c2", 12), ("c3", 8)):
        label = np.zeros((16, 16, slices), dtype=np.uint8)
        label[4:12, 4:12, 1:-1] = 1
        write_nifti(data / "imagesTr" / f"{cid}.nii", np.full(label.shape, 40, np.int16))
        write_nifti(data / "labelsTr" / f"{cid}.nii", label)
    work = plan(data, tmp_path / "store.zarr", {}, Settings(), "h", None)
    assert [j.case_id for j in work.todo] == ["c2", "c3", "c1"]


def test_a_lone_case_or_two_always_leave_one_to_train_on() -> None:
    """One or two cases whose hashes fall in val or test: one of them is a train case
    all the same (a store of one case could not train a model); an existing split never
    moves; with 3+ cases val and test are filled from the others."""
    fractions = (0.7, 0.15, 0.15)
    not_train = [
        f"c{i}" for i in range(500) if assign_split(f"c{i}", fractions, "liverpipe") != "train"
    ]
    assert assign_splits(not_train[:1], {}, fractions, "liverpipe") == {not_train[0]: "train"}
    two = assign_splits(not_train[:2], {}, fractions, "liverpipe")
    assert sorted(two.values()).count("train") == 1
    three = assign_splits(not_train[:3], {}, fractions, "liverpipe")
    assert sorted(three.values()) == ["test", "train", "val"]
    kept = assign_splits(not_train[1:2], {not_train[0]: "val"}, fractions, "liverpipe")
    assert kept == {not_train[1]: "train"}  # the new case trains; the old one stays in val
    assert assign_splits(not_train[:1], {}, (0.0, 0.5, 0.5), "liverpipe") != {
        not_train[0]: "train"
    }  # a zero train share is respected


@pytest.mark.parametrize("seed", range(6))
def test_label_support_is_the_bounding_box_and_the_column_counts(seed: int) -> None:
    """One pass gives what the label's crop and its field-of-view report need: the box of
    the labelled voxels (grown by the margin, clipped to the volume) and the count of
    labelled voxels per column, on a strided view as canonical views are."""
    from liverpipe.preprocess import LabelSupport

    rng = np.random.default_rng(seed)
    label = np.zeros((37, 29, 23), dtype=np.uint8)
    z, y, x = (sorted(rng.integers(0, n, 2)) for n in label.shape)
    label[z[0] : z[1] + 1, y[0] : y[1] + 1, x[0] : x[1] + 1] = rng.integers(
        0, 3, (z[1] - z[0] + 1, y[1] - y[0] + 1, x[1] - x[0] + 1)
    )
    view = label[:, ::-1, :]  # a flipped, non-contiguous view
    support = LabelSupport.of(view, slab=5)
    assert np.array_equal(support.columns, (view > 0).sum(axis=0))
    hits = np.nonzero(view)
    for margin in (0, 2, 40):
        expected = (
            tuple(
                slice(max(int(h.min()) - margin, 0), min(int(h.max()) + 1 + margin, n))
                for h, n in zip(hits, view.shape, strict=True)
            )
            if hits[0].size
            else None
        )
        assert support.box(margin) == expected
    assert LabelSupport.of(np.zeros((4, 5, 6), np.uint8)).box(2) is None
