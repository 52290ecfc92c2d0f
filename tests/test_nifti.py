"""NIfTI reading and per-file validation: encodings load right, bad files get their own error."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import write_nifti

import liverpipe.io.nifti
from liverpipe.errors import GeometryMismatchError, InvalidScanError, LabelValueError
from liverpipe.io import read_header, read_labels_hashed, read_voxels, read_voxels_hashed
from liverpipe.preprocess import (
    check_affines_match,
    check_hu_values,
    check_image_values,
    check_label_values,
    swapped_codes_finding,
)
from liverpipe.settings import CheckConfig

RNG = np.random.default_rng(42)
VOLUME = RNG.integers(-1000, 1500, size=(7, 6, 5)).astype(np.int16)


def _read(path: Path) -> np.ndarray:
    return read_voxels(read_header(path))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("version", [1, 2])
def test_round_trip_int16_nifti1_and_nifti2(tmp_path: Path, suffix: str, version: int) -> None:
    path = write_nifti(tmp_path / f"v{suffix}", VOLUME, version=version)
    data = _read(path)
    assert data.dtype == np.int16
    np.testing.assert_array_equal(data, VOLUME)


def test_big_endian_data_comes_back_native(tmp_path: Path) -> None:
    header = nib.Nifti1Header().as_byteswapped(">")
    header.set_data_shape(VOLUME.shape)
    header.set_data_dtype(np.int16)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    path = tmp_path / "big.nii"
    path.write_bytes(header.binaryblock + b"\0" * 4 + VOLUME.astype(">i2").tobytes(order="F"))
    assert read_header(path).disk_dtype.byteorder == ">"
    data = _read(path)
    assert data.dtype.isnative
    np.testing.assert_array_equal(data, VOLUME)


def test_scaled_uint16_applies_slope_and_intercept(tmp_path: Path) -> None:
    raw = (VOLUME.astype(np.int32) + 1024).astype(np.uint16)
    path = write_nifti(tmp_path / "scaled.nii.gz", raw, slope_inter=(0.5, -1024.0))
    data = _read(path)
    assert data.dtype == np.float32
    np.testing.assert_allclose(data, raw * 0.5 - 1024.0)


def test_qform_used_when_sform_code_is_zero(tmp_path: Path) -> None:
    qform = np.diag([0.7, 0.7, 3.0, 1.0])
    qform[:3, 3] = [-100, 50, 20]
    image = nib.Nifti1Image(VOLUME, qform)
    image.set_qform(qform, code=1)
    image.set_sform(np.diag([9.0, 9.0, 9.0, 1.0]), code=0)
    path = tmp_path / "q.nii"
    nib.save(image, path)
    np.testing.assert_allclose(read_header(path).affine, qform)


def test_trailing_singleton_fourth_axis_is_accepted(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "s.nii", VOLUME[..., None])
    info = read_header(path)
    assert info.shape == VOLUME.shape
    np.testing.assert_array_equal(read_voxels(info), VOLUME)


def test_true_4d_volume_is_refused(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "4d.nii", np.stack([VOLUME, VOLUME], axis=-1))
    with pytest.raises(InvalidScanError, match=r"4d\.nii: the volume has shape \(7, 6, 5, 2\)"):
        read_header(path)


def test_absurd_header_is_refused_before_reading_data(tmp_path: Path) -> None:
    header = nib.Nifti1Header()
    header.set_data_shape((4000, 4000, 4000))
    header.set_data_dtype(np.int16)
    path = tmp_path / "huge.nii"
    path.write_bytes(header.binaryblock + b"\0" * 4 + b"tiny")  # a few bytes, not 128 GB
    with pytest.raises(InvalidScanError, match="claims shape") as err:
        read_header(path, CheckConfig())
    assert "max_dim" in str(err.value)


def test_configurable_voxel_cap(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "v.nii", VOLUME)
    with pytest.raises(InvalidScanError, match="210 voxels"):
        read_header(path, CheckConfig(max_voxels=100))


@pytest.mark.parametrize("zooms", [(1.0, 0.0, 1.0), (1.0, float("nan"), 1.0)])
def test_bad_spacing_is_refused(tmp_path: Path, zooms: tuple[float, float, float]) -> None:
    path = write_nifti(tmp_path / "z.nii", VOLUME)
    header = nib.load(path).header.copy()
    header["pixdim"][1:4] = zooms
    header["qform_code"] = 0
    header["sform_code"] = 0
    blob = path.read_bytes()
    path.write_bytes(header.binaryblock + blob[348:])
    with pytest.raises(InvalidScanError, match="spacing"):
        read_header(path)


def test_singular_affine_is_refused(tmp_path: Path) -> None:
    singular = np.diag([1.0, 1.0, 1.0, 1.0])
    singular[:3, 2] = singular[:3, 1]  # two identical columns
    image = nib.Nifti1Image(VOLUME, singular)
    image.set_sform(singular, code=2)
    path = tmp_path / "sing.nii"
    nib.save(image, path)
    with pytest.raises(InvalidScanError, match="affine"):
        read_header(path)


def test_truncated_gzip_is_refused(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "t.nii.gz", RNG.normal(size=(40, 40, 40)).astype(np.float32))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    info = read_header(path)  # the header itself is intact
    with pytest.raises(InvalidScanError, match="truncated or corrupt"):
        read_voxels(info)


def test_truncated_plain_nifti_is_refused_from_its_size(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "t.nii", VOLUME)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(InvalidScanError, match="truncated"):
        read_header(path)


LABEL = RNG.integers(0, 3, size=(128, 96, 80)).astype(np.uint8)


@pytest.mark.parametrize("dtype", ["u1", "<i2", ">i2", "<f4", ">f8", "<u2"])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_labels_are_read_piece_by_piece_into_uint8(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str, suffix: str
) -> None:
    """Whatever the file's type and byte order: the uint8 map that ``read_voxels`` gives
    cast, the same file hash, each piece checked before it is cast, and no buffer of the
    file's type the size of the volume."""
    import tracemalloc

    monkeypatch.setattr(liverpipe.io.nifti, "_GUNZIP_PIECE", 16 << 10)  # many pieces
    path = write_nifti(tmp_path / f"label{suffix}", LABEL.astype(dtype))
    info = read_header(path)
    whole, whole_sha = read_voxels_hashed(info)
    seen: list[np.dtype] = []
    tracemalloc.start()
    labels, sha = read_labels_hashed(
        info, lambda v: seen.append(v.dtype) or check_label_values(path, v)
    )
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert labels.dtype == np.uint8 and labels.shape == LABEL.shape and sha == whole_sha
    assert np.array_equal(labels, whole.astype(np.uint8)) and np.array_equal(labels, LABEL)
    assert all(d == whole.dtype for d in seen)  # checked in the file's type, native order
    if dtype != "u1":
        # the map and the readers' buffers; decoding whole, an int16 file alone needs 2x
        assert len(seen) > 1 and peak < 2 * LABEL.nbytes, peak


def test_a_bad_label_value_in_the_last_piece_or_a_cut_stream_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(liverpipe.io.nifti, "_GUNZIP_PIECE", 16 << 10)
    bad = LABEL.astype(np.float32)
    bad[-1, -1, -1] = 0.5  # the last voxel of the file
    path = write_nifti(tmp_path / "bad.nii.gz", bad)
    with pytest.raises(LabelValueError, match=r"integers, found 0\.5"):
        read_labels_hashed(read_header(path), lambda v: check_label_values(path, v))
    cut = write_nifti(tmp_path / "cut.nii.gz", LABEL.astype(np.int16))
    cut.write_bytes(cut.read_bytes()[:-300])
    with pytest.raises(InvalidScanError, match="truncated") as err:
        read_labels_hashed(read_header(cut), lambda v: check_label_values(cut, v))
    assert str(err.value).startswith(f"{cut}: ")


def test_misnamed_plain_file_and_garbage(tmp_path: Path) -> None:
    plain = write_nifti(tmp_path / "p.nii", VOLUME)
    fake_gz = tmp_path / "p2.nii.gz"
    fake_gz.write_bytes(plain.read_bytes())
    with pytest.raises(
        InvalidScanError,
        match=r"plain \(uncompressed\) NIfTI-1 but its name ends in \.gz.*rename it to \.nii",
    ):
        read_header(fake_gz)
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(gzip.compress(b"not a nifti header at all" * 20))
    with pytest.raises(InvalidScanError, match="gzip stream whose content is not NIfTI"):
        read_header(junk)
    gz_named_plain = tmp_path / "g.nii"
    gz_named_plain.write_bytes(gzip.compress(plain.read_bytes()))
    with pytest.raises(InvalidScanError, match=r"gzip-compressed NIfTI-1.*rename it to \.nii\.gz"):
        read_header(gz_named_plain)
    with pytest.raises(InvalidScanError, match="does not exist"):
        read_header(tmp_path / "missing.nii")


def test_complex_dtype_is_refused(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "c.nii", VOLUME.astype(np.complex64))
    with pytest.raises(InvalidScanError, match="not a real scalar type"):
        read_header(path)


def test_non_finite_image_values(tmp_path: Path) -> None:
    data = VOLUME.astype(np.float32)
    data[0, 0, 0] = np.nan
    data[1, 1, 1] = np.inf
    with pytest.raises(InvalidScanError, match="2 voxels are NaN or infinite"):
        check_image_values(tmp_path / "x.nii", data)
    check_image_values(tmp_path / "x.nii", VOLUME)  # integer images are finite by construction


def test_label_values() -> None:
    path = Path("lab.nii.gz")
    check_label_values(path, np.array([0, 1, 2], dtype=np.uint8))
    check_label_values(
        path, np.array([0.0, 1.0, 2.0], dtype=np.float32)
    )  # integral floats are fine
    with pytest.raises(LabelValueError, match="found 3"):
        check_label_values(path, np.array([0, 1, 3], dtype=np.uint8))
    with pytest.raises(LabelValueError, match=r"must be integers, found 0\.5"):
        check_label_values(path, np.array([0.0, 0.5, 2.0], dtype=np.float32))
    with pytest.raises(LabelValueError, match="found -1"):
        check_label_values(path, np.array([0, -1], dtype=np.int16))
    with pytest.raises(LabelValueError, match="integers, found nan"):
        check_label_values(path, np.array([0.0, np.nan], dtype=np.float32))


@pytest.fixture(scope="module")
def real_hu(real_ct: tuple[Path, Path]) -> np.ndarray:
    """The real CT's voxels in HU (int16, file order)."""
    return np.asarray(nib.load(real_ct[0]).dataobj)


def _not_hu(real_hu: np.ndarray, kind: str) -> np.ndarray:
    """The real CT as exports get it wrong."""
    if kind == "no intercept":  # the stored DICOM values: HU + 1024
        return (real_hu.astype(np.int32) + 1024).clip(0).astype(np.uint16)
    if kind == "8-bit":  # an abdominal window written as 0..255
        return ((real_hu.clip(-160, 240) + 160) * (255 / 400)).astype(np.uint8)
    if kind == "normalised":  # z-scored
        return ((real_hu - real_hu.mean()) / real_hu.std()).astype(np.float32)
    if kind == "label map":
        return (real_hu > 0).astype(np.int16) + (real_hu > 60)
    assert kind == "blank"
    return np.zeros_like(real_hu)


NOT_HU = {
    "no intercept": ("look stored without their rescale intercept", "RescaleIntercept"),
    "8-bit": ("an 8-bit image (a windowed export), not HU", "Hounsfield units"),
    "normalised": ("the values look normalised, not HU", "[check] max_lowest_hu"),
    "label map": ("only the values 0, 1, 2, as in a label map", "not swapped"),
    "blank": ("every voxel is 0: the scan is blank", "export or copy the scan again"),
}


@pytest.mark.parametrize("kind", sorted(NOT_HU))
def test_values_that_are_not_hu_are_named_for_what_they_look_like(
    real_hu: np.ndarray, kind: str
) -> None:
    """A real CT exported without its intercept, windowed to 8 bits, z-scored, a label map
    in its place, or blank: each is refused with its own diagnosis and fix."""
    path = Path("imagesTr/case.nii.gz")
    check_hu_values(path, real_hu, -50.0)  # the scan itself is in HU
    problem, fix = NOT_HU[kind]
    with pytest.raises(InvalidScanError) as err:
        check_hu_values(path, _not_hu(real_hu, kind), -50.0)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and problem in message, message
    assert f"Fix: {fix}" in message or fix in message.split("Fix:")[1], message
    check_hu_values(path, _not_hu(real_hu, kind), None)  # the check can be turned off


def test_hu_check_reads_the_whole_volume_before_refusing() -> None:
    """The strided look may miss a small air pocket; the full pass then finds it."""
    data = np.full((9, 9, 9), 40, dtype=np.int16)
    data[1, 2, 3] = -1000  # off the every-fourth-voxel lattice
    check_hu_values(Path("x.nii"), data, -50.0)
    data[1, 2, 3] = 40
    with pytest.raises(InvalidScanError, match="every voxel is 40"):
        check_hu_values(Path("x.nii"), data, -50.0)


def test_a_scan_in_place_of_the_label_is_named_a_scan(real_hu: np.ndarray) -> None:
    path = Path("labelsTr/case.nii.gz")
    with pytest.raises(LabelValueError) as err:
        check_label_values(path, real_hu)
    message = str(err.value)
    assert "distinct values" in message and "looks like a CT scan in HU, not a label" in message
    assert "may be swapped" in message
    with pytest.raises(LabelValueError, match="found 3, 7"):  # a few stray ids stay plain
        check_label_values(path, np.array([0, 1, 3, 7], dtype=np.int16))


def test_swapped_liver_and_tumour_codes_are_warned(real_ct: tuple[Path, Path]) -> None:
    """The real liver mask with a lesion inside: fine as it is, warned with its codes
    swapped, and not warned when a large tumour fills the liver from within."""
    liver = np.asarray(nib.load(real_ct[1]).dataobj) > 0
    centre = np.round(np.argwhere(liver).mean(axis=0)).astype(int)
    grid = np.indices(liver.shape)
    label = liver.astype(np.uint8)
    lesion = ((grid - centre[:, None, None, None]) ** 2).sum(axis=0) <= 4**2
    label[lesion & liver] = 2
    path = Path("labelsTr/case.nii.gz")
    assert swapped_codes_finding(path, label) is None
    swapped = np.choose(label, [0, 2, 1]).astype(np.uint8)
    warning = swapped_codes_finding(path, swapped)
    assert warning is not None and warning.startswith(f"{path}: the label has more tumour")
    assert "codes look swapped" in warning and "Fix: remap the label" in warning
    eroded = liver.copy()  # a tumour that leaves only a 2-voxel rim of liver
    for axis in range(3):
        for shift in (1, 2, -1, -2):
            eroded &= np.roll(liver, shift, axis=axis)
    burden = np.where(eroded, 2, liver).astype(np.uint8)
    assert (burden == 2).sum() > (burden == 1).sum()
    assert swapped_codes_finding(path, burden) is None


def test_image_label_grids_must_agree(tmp_path: Path) -> None:
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    image = read_header(write_nifti(tmp_path / "i.nii", VOLUME, affine))
    same = read_header(write_nifti(tmp_path / "l.nii", VOLUME.astype(np.uint8) * 0, affine))
    check_affines_match(image, same, 1e-3)
    shifted = affine.copy()
    shifted[0, 3] += 0.01
    moved = read_header(write_nifti(tmp_path / "m.nii", VOLUME.astype(np.uint8) * 0, shifted))
    with pytest.raises(GeometryMismatchError, match=r"0\.01 mm away"):
        check_affines_match(image, moved, 1e-3)
    check_affines_match(image, moved, 0.02)
    small = read_header(write_nifti(tmp_path / "s.nii", np.zeros((7, 6, 4), np.uint8), affine))
    with pytest.raises(GeometryMismatchError, match=r"label shape \(7, 6, 4\) differs"):
        check_affines_match(image, small, 1e-3)


PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
DICOM = bytes(128) + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00" + bytes(600)
CASES = {
    "empty": (b"", "empty (0 bytes)", "holds no data"),
    "png": (PNG, "a PNG image", "export the CT volume"),
    "jpeg": (b"\xff\xd8\xff\xe0" + bytes(500), "a JPEG image", "export the CT volume"),
    "dicom": (DICOM, "a DICOM file", "dcm2niix"),
    "zip": (b"PK\x03\x04" + bytes(500), "a ZIP archive", "unzip it"),
    "lfs": (
        b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 12\n",
        "Git LFS pointer",
        "git lfs pull",
    ),
    "html": (b"<!DOCTYPE html><html>not found</html>", "HTML page", "download"),
    "gzip-png": (gzip.compress(PNG), "gzip stream whose content is not NIfTI but a PNG", "export"),
    "gzip-cut": (gzip.compress(bytes(1000))[:12], "cannot be decompressed", "gzip -t"),
}


@pytest.mark.parametrize("kind", sorted(CASES))
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_files_that_are_not_nifti_are_named_by_content(
    tmp_path: Path, kind: str, suffix: str
) -> None:
    """A file gets the diagnosis of what it is, never a rename that cannot help."""
    content, problem, fix = CASES[kind]
    path = tmp_path / f"scan{suffix}"
    path.write_bytes(content)
    with pytest.raises(InvalidScanError) as err:
        read_header(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and problem in message and fix in message
    assert "rename" not in message


def test_header_that_nibabel_refuses_is_an_invalid_scan(tmp_path: Path) -> None:
    """scl_slope = 1 with scl_inter = NaN: nibabel raises HeaderDataError on load."""
    image = nib.Nifti1Image(VOLUME, np.eye(4))
    image.header["scl_slope"] = 1.0
    image.header["scl_inter"] = np.nan
    path = tmp_path / "nan_inter.nii.gz"
    nib.save(image, path)
    with pytest.raises(
        InvalidScanError, match=r"invalid intercept nan.*Fix: set scl_slope/scl_inter"
    ):
        read_header(path)
