"""DICOM CT series in (issue 14, first part): the real series' geometry, convert, predict,
and a clear refusal for each kind of bad series (made from the real one with pydicom)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import REPO, assign_uids, copy_runs
from typer.testing import CliRunner

from liverpipe.cli import app
from liverpipe.errors import InvalidScanError
from liverpipe.io import find_series, read_series

REAL = REPO.parent / "shared" / "data" / "real-dicom"
SERIES = REAL / "series"


@pytest.fixture(scope="module")
def real_series() -> Path:
    if not SERIES.is_dir():
        pytest.fail(f"the real DICOM fixture is missing at {SERIES}; the repo expects ../shared")
    return SERIES


def test_the_real_series_overlays_the_independent_converters_mask(real_series: Path) -> None:
    (series,) = find_series(real_series)
    assert series.series_uid == "" and len(series.files) == 20  # UIDs blanked
    image = read_series(series)
    data = np.asarray(image.dataobj)
    assert data.shape == (512, 512, 20) and data.dtype == np.int16
    # Spacing from the positions (2 mm), not from SliceThickness (3 mm).
    np.testing.assert_allclose(image.header.get_zooms(), (0.9765625, 0.9765625, 2.0))
    assert data.min() == -1024  # RescaleIntercept applied to the stored values
    liver = nib.load(REAL / "liver.nii.gz")
    # The mask's voxels sit exactly on the series' voxels (its rows run the other way).
    mapping = np.linalg.inv(image.affine) @ liver.affine
    np.testing.assert_allclose(mapping, np.round(mapping), atol=1e-4)
    np.testing.assert_allclose(
        np.round(mapping), [[1, 0, 0, 0], [0, -1, 0, 511], [0, 0, 1, 0], [0, 0, 0, 1]]
    )
    mask = np.asarray(liver.dataobj)[:, ::-1, :] > 0  # onto the series' voxel order
    hu = data[mask]
    assert mask.sum() == 366_708 and 30 < np.median(hu) < 120  # liver parenchyma
    assert np.median(data[~mask]) < -500  # the mask is not on the body as a whole


def test_convert_writes_the_series_as_nifti(real_series: Path, tmp_path: Path) -> None:
    out = tmp_path / "ct.nii.gz"
    result = CliRunner().invoke(app, ["convert", str(real_series), str(out)])
    assert result.exit_code == 0, result.output
    written, direct = nib.load(out), read_series(find_series(real_series)[0])
    np.testing.assert_array_equal(written.affine, direct.affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(direct.dataobj))
    assert int(written.header["sform_code"]) == 1 and int(written.header["qform_code"]) == 1


def test_predict_reads_a_series_and_writes_the_mask_on_its_grid(
    real_series: Path, tiny_runs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "masks"
    model = str(tiny_runs / "manet")
    result = CliRunner().invoke(app, ["predict", str(real_series), "-o", str(out), "-m", model])
    assert result.exit_code == 0, result.output
    (mask_path,) = sorted(out.glob("*.nii.gz"))
    mask, grid = nib.load(mask_path), read_series(find_series(real_series)[0])
    assert mask.shape == grid.shape and np.asarray(mask.dataobj).dtype == np.uint8
    np.testing.assert_allclose(mask.affine, grid.affine, atol=1e-6)
    record = json.loads(mask_path.with_name(mask_path.name.replace(".nii.gz", ".json")).read_text())
    assert record["scan"] == str(real_series)


def _copy(real: Path, target: Path, edit: Callable[[int, pydicom.Dataset], bool | None]) -> Path:
    """The real series rewritten by ``edit(index, dataset)`` (sorted by position; a slice
    is dropped when ``edit`` returns False)."""
    target.mkdir(parents=True, exist_ok=True)
    files = sorted(real.iterdir(), key=lambda p: -float(pydicom.dcmread(p).ImagePositionPatient[2]))
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        if edit(i, ds) is False:
            continue
        ds.save_as(target / path.name)
    return target


def _set(name: str, value: object) -> Callable[[int, pydicom.Dataset], None]:
    def edit(_: int, ds: pydicom.Dataset) -> None:
        setattr(ds, name, value)

    return edit


def _resize_one(i: int, ds: pydicom.Dataset) -> None:
    """One series (a UID) with one slice stored at 256 x 256."""
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    if i == 7:
        ds.decompress()
        ds.PixelData = np.ascontiguousarray(ds.pixel_array[::2, ::2]).tobytes()
        ds.Rows, ds.Columns = 256, 256


def _drop_rescale(_: int, ds: pydicom.Dataset) -> None:
    del ds.RescaleSlope, ds.RescaleIntercept


def _tilt(i: int, ds: pydicom.Dataset) -> None:
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x, y + 0.5 * i, z]  # each slice shifted along y: gantry tilt


def _rotate_one(i: int, ds: pydicom.Dataset) -> None:
    """One series (a UID, as a scanner writes it) with one slice turned by 5.7 degrees.
    Without the UID the slice would be grouped apart, by geometry."""
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    if i == 7:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9950042, -0.0998334]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda i, ds: i != 9, "irregular: 4.00 mm between"),  # a missing slice
        (_rotate_one, "different image orientations"),
        (_tilt, "gantry tilt"),
        (_set("Modality", "MR"), "is MR, not CT"),
        (lambda i, ds: i < 2, "2 slice\\(s\\), fewer than the 3 needed"),
        (_set("ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"]), "is a localizer \\(scout"),
        (_drop_rescale, "20 slice\\(s\\) lack RescaleSlope or RescaleIntercept"),
        (_set("PixelSpacing", [0, 0]), "PixelSpacing is \\[0.0, 0.0\\] mm"),
        (_set("ImageOrientationPatient", [1, 0, 0, 1, 0, 0]), "not two orthogonal unit"),
        (_resize_one, "different matrix sizes 256 x 256 and 512 x 512"),
    ],
    ids=[
        "missing-slice",
        "mixed-orientation",
        "gantry-tilt",
        "not-ct",
        "too-few",
        "localizer",
        "no-rescale",
        "zero-spacing",
        "parallel-axes",
        "mixed-sizes",
    ],
)
def test_a_bad_series_is_refused_with_its_problem_and_fix(
    real_series: Path,
    tmp_path: Path,
    edit: Callable[[int, pydicom.Dataset], bool | None],
    message: str,
) -> None:
    folder = _copy(real_series, tmp_path / "bad", edit)
    with pytest.raises(InvalidScanError, match=message) as err:
        for series in find_series(folder):
            read_series(series)
    assert str(folder) in str(err.value) and "Fix:" in str(err.value)


def test_two_series_mixed_in_one_folder(real_series: Path, tmp_path: Path) -> None:
    """Blank UIDs: two copies of the series in one folder are one stack with every
    position twice (refused); a different SeriesNumber separates them."""
    folder = tmp_path / "mixed"
    _copy(real_series, folder, lambda i, ds: None)
    for path in list(folder.iterdir()):
        shutil.copy(path, folder / f"copy_{path.name}")
    (series,) = find_series(folder)
    with pytest.raises(InvalidScanError, match="two slices lie at the same position"):
        read_series(series)
    for path in folder.glob("copy_*"):
        ds = pydicom.dcmread(path)
        ds.SeriesNumber = 2
        ds.save_as(path)
    found = find_series(folder)
    assert len(found) == 2 and all(len(s.files) == 20 for s in found)
    assert all(np.asarray(read_series(s).dataobj).shape == (512, 512, 20) for s in found)


def test_undecodable_pixel_data_names_the_transfer_syntax(
    real_series: Path, tmp_path: Path
) -> None:
    def mislabel(_: int, ds: pydicom.Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.UID("1.2.840.10008.1.2.4.100")  # MPEG2

    folder = _copy(real_series, tmp_path / "mpeg", mislabel)
    (series,) = find_series(folder)
    with pytest.raises(InvalidScanError, match="transfer syntax MPEG2"):
        read_series(series)


@pytest.mark.parametrize("damage", ["cut", "short", "no-pixels"])
def test_a_damaged_slice_is_named_not_blamed_on_the_transfer_syntax(
    real_series: Path, tmp_path: Path, damage: str
) -> None:
    """A slice cut short (a copy that stopped), one whose pixel data element holds half
    the image (which GDCM would pad without a word) or one without pixel data: the
    error names that file instead of suggesting another transfer syntax."""
    folder = _copy(real_series, tmp_path / damage, lambda i, ds: ds.decompress())
    victim = sorted(folder.iterdir())[7]
    if damage == "cut":
        victim.write_bytes(victim.read_bytes()[:-200_000])
        expected = f"{victim.name} is cut short: its pixel data holds 324288 of 524288 bytes"
    elif damage == "short":
        ds = pydicom.dcmread(victim)
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
        ds.save_as(victim)
        expected = f"{victim.name} is cut short: its pixel data holds 262144 of 524288 bytes"
    else:
        ds = pydicom.dcmread(victim)
        del ds.PixelData
        ds.save_as(victim)
        expected = f"{victim.name} has no pixel data"
    (series,) = find_series(folder)
    with pytest.raises(InvalidScanError, match=expected) as err:
        read_series(series)
    assert "transfer syntax" not in str(err.value) and "Fix:" in str(err.value)


def test_a_dicomdir_and_a_report_beside_the_slices_are_passed_over(
    real_series: Path, tmp_path: Path
) -> None:
    """An exported study folder holds more than slices: a DICOMDIR and non-image objects
    (here a structured report) are not taken for slices without geometry."""
    folder = _copy(real_series, tmp_path / "study", lambda i, ds: None)
    meta = pydicom.dataset.FileMetaDataset()
    for name, sop_class in (
        ("DICOMDIR", "1.2.840.10008.1.3.10"),
        ("report.dcm", "1.2.840.10008.5.1.4.1.1.88.11"),  # Basic Text SR
    ):
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.Modality = sop_class, "SR"
        ds.save_as(folder / name, enforce_file_format=True)
    (series,) = find_series(folder)
    assert len(series.files) == 20
    assert np.asarray(read_series(series).dataobj).shape == (512, 512, 20)


def test_a_folder_without_dicom_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a scan")
    (tmp_path / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    with pytest.raises(InvalidScanError, match="holds no DICOM files"):
        find_series(tmp_path)


def test_check_reports_each_series_by_its_folder(real_series: Path, tmp_path: Path) -> None:
    good = _copy(real_series, tmp_path / "study" / "good", lambda i, ds: None)
    _copy(real_series, tmp_path / "study" / "gappy", lambda i, ds: i != 9)
    for path in (tmp_path / "study" / "gappy").iterdir():  # a series of its own
        ds = pydicom.dcmread(path)
        ds.SeriesNumber = 5
        ds.save_as(path)
    result = CliRunner().invoke(app, ["check", str(tmp_path / "study"), "--json"])
    assert result.exit_code == 1  # one series is bad
    reports = {r["case_id"]: r for r in json.loads(result.stdout)}
    assert len(reports) == 2
    ok = [r for r in reports.values() if r["ok"]]
    bad = [r for r in reports.values() if not r["ok"]]
    assert len(ok) == 1 and len(bad) == 1
    assert "irregular" in bad[0]["errors"][0] and "gappy" in bad[0]["errors"][0]
    assert ok[0]["warnings"] and all(str(good) in w for w in ok[0]["warnings"])


def _with_uids(real: Path, target: Path) -> Path:
    """The real series with fresh, consistent UIDs, as a de-identification pipeline that
    keeps them would write it (the fixture's were blanked)."""
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()

    return _copy(real, target, lambda _, ds: assign_uids(ds, study, series))


def test_predict_writes_a_dicom_seg_that_reads_back_with_highdicom(
    real_series: Path, tiny_runs: Path, tmp_path: Path
) -> None:
    import highdicom as hd

    folder = _with_uids(real_series, tmp_path / "ct")
    out = tmp_path / "masks"
    model = str(tiny_runs / "manet")
    args = ["predict", str(folder), "-o", str(out), "-m", model, "--seg"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (series,) = find_series(folder)
    mask_path = out / f"{series.name}.nii.gz"
    record = json.loads((out / f"{series.name}.json").read_text())
    seg = hd.seg.segread(record["seg"])
    assert (
        seg.Modality == "SEG"
        and seg.StudyInstanceUID == pydicom.dcmread(series.files[0]).StudyInstanceUID
    )
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Liver", "Liver tumour"]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    sources = [pydicom.dcmread(p).SOPInstanceUID for p in series.files]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=sources, segment_numbers=[1, 2]
    )
    labels = np.asarray(nib.load(mask_path).dataobj).transpose(2, 1, 0)  # (slice, row, col)
    np.testing.assert_array_equal(pixels[..., 0] > 0, labels >= 1)
    np.testing.assert_array_equal(pixels[..., 1] > 0, labels == 2)


def test_an_anonymised_series_gets_its_mask_and_a_clear_no_seg(
    real_series: Path, tiny_runs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "masks"
    args = ["predict", str(real_series), "-o", str(out), "-m", str(tiny_runs / "manet"), "--seg"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (record_path,) = out.glob("*.json")
    record = json.loads(record_path.read_text())
    assert record["seg"] is None and "SOPInstanceUID" in record["seg_error"]
    assert "NIfTI mask is written" in record["seg_error"] and not list(out.glob("*.dcm"))
    assert (out / record_path.name.replace(".json", ".nii.gz")).is_file()


def test_write_seg_round_trips_the_real_liver_mask(real_series: Path, tmp_path: Path) -> None:
    import highdicom as hd

    from liverpipe.io import write_seg

    (series,) = find_series(_with_uids(real_series, tmp_path / "ct"))
    labels = (np.asarray(nib.load(REAL / "liver.nii.gz").dataobj)[:, ::-1, :] > 0).astype(np.uint8)
    labels[250:270, 300:320, 5:9] = 2  # a tumour block on the series grid
    seg = hd.seg.segread(write_seg(labels, series, tmp_path / "liver.seg.dcm"))
    sources = [pydicom.dcmread(p).SOPInstanceUID for p in series.files]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=sources, segment_numbers=[1, 2]
    )
    frames = labels.transpose(2, 1, 0)
    assert (frames >= 1).sum() > 300_000
    np.testing.assert_array_equal(pixels[..., 0] > 0, frames >= 1)
    np.testing.assert_array_equal(pixels[..., 1] > 0, frames == 2)


def test_ingest_predicts_a_series_folder_once(
    real_series: Path, tiny_runs_root: Path, tmp_path: Path
) -> None:
    """A series folder in INBOX/imagesTs is one unlabelled case: predicted once with the
    champion, recorded by folder identity, and not read again while it is unchanged."""
    import os

    from liverpipe.ops import Ledger, champion, predict_pending, to_predict, unlabelled_scans

    runs, out = tmp_path / "runs", tmp_path / "outputs"
    copy_runs(tiny_runs_root, runs)
    inbox = tmp_path / "inbox"
    study = _copy(real_series, inbox / "imagesTs" / "ct_study", lambda i, ds: None)
    (inbox / "imagesTs" / "empty_folder").mkdir()
    best = champion(runs)
    scans = unlabelled_scans(inbox)
    assert scans == [study, inbox / "imagesTs" / "empty_folder"]
    ledger = Ledger()
    todo, _ = to_predict(scans, ledger, best)
    assert [(p.case_id, p.reason) for p in todo] == [("ct_study", "new"), ("empty_folder", "new")]
    predicted, failed = predict_pending(todo, ledger, runs, out, tta=False)
    assert predicted == ["ct_study"] and "holds no DICOM files" in failed["empty_folder"]
    entry = Ledger.load(out).entries["ct_study"]
    assert entry["model_version"]["run_ids"] == [best]
    mask = nib.load(entry["mask"])
    assert mask.shape == (512, 512, 20)
    ledger = Ledger.load(out)
    assert to_predict(scans, ledger, best) == ([], [])  # nothing new; the failure is not retried
    first = sorted(study.iterdir())[0]
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    assert to_predict(scans, ledger, best) == ([], ["ct_study"])  # re-hashed, same bytes
    first.unlink()
    todo, _ = to_predict(scans, ledger, best)
    assert [(p.case_id, p.reason) for p in todo] == [("ct_study", "changed")]
