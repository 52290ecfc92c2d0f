"""DICOM CT series in: find the series in a folder, check them, read them as a volume.

Headers come from pydicom (without pixel data); pixels from SimpleITK's GDCM reader,
which decodes the usual compressed transfer syntaxes (JPEG 2000, JPEG-LS, JPEG, RLE)
and applies RescaleSlope/RescaleIntercept. The geometry is liverpipe's own:

* slices are grouped by SeriesInstanceUID, or, where anonymisation blanked it, by
  geometry (orientation, pixel spacing, matrix size);
* sorted by ImagePositionPatient along the slice normal (row x column direction);
* the slice spacing comes from those positions, never from SliceThickness;
* the affine maps (column, row, slice) indices to RAS+ mm, as a NIfTI converter does.

A series then becomes a NIfTI file (:func:`write_nifti`) and takes the same forward
path as any scan. Every refusal names the series folder, the problem and the fix.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from liverpipe.errors import InvalidScanError
from liverpipe.settings import CheckConfig

__all__ = [
    "DicomSeries",
    "find_series",
    "holds_dicom",
    "read_series",
    "write_nifti",
]

#: Directions that differ by less than this (cosine components) count as equal.
ORIENTATION_TOLERANCE = 1e-4
#: In-plane drift between consecutive slice positions (mm) beyond which the stack is tilted.
TILT_TOLERANCE_MM = 0.01
#: A gap between slice positions larger than this fraction above the median is a missing slice.
GAP_TOLERANCE = 0.1

_PREAMBLE, _DICM = 128, b"DICM"
#: Media Storage Directory Storage: a DICOMDIR, an index of a medium, not an image.
_DICOMDIR = "1.2.840.10008.1.3.10"
#: Element values longer than this are left on disk when a slice is checked for damage.
_DEFER_BYTES = 4096
#: Slices closer than this along the slice normal sit at one position (duplicates).
_SAME_POSITION_MM = 1e-3


@dataclass(frozen=True)
class DicomSeries:
    """One series' files (sorted along the slice normal) and its headers' key facts."""

    folder: Path
    files: tuple[Path, ...]
    series_uid: str  # "" where anonymisation blanked it
    positions: np.ndarray  # (n, 3) ImagePositionPatient, LPS mm, in file order
    row: np.ndarray  # direction of increasing column index (LPS)
    column: np.ndarray  # direction of increasing row index (LPS)
    spacing: tuple[float, float]  # (between columns, between rows), mm
    shape: tuple[int, int]  # (columns, rows)
    modality: str
    transfer_syntax: str
    image_type: tuple[str, ...] = ()  # ImageType of the first slice, e.g. ORIGINAL, PRIMARY, AXIAL
    unscaled: tuple[str, ...] = ()  # files without RescaleSlope or RescaleIntercept

    @property
    def name(self) -> str:
        """A file name for the series: its folder, with the UID's tail when it has one."""
        tail = f"_{self.series_uid.rsplit('.', 1)[-1]}" if self.series_uid else ""
        return f"{self.folder.name}{tail}"


def holds_dicom(folder: Path) -> bool:
    """True when ``folder`` (or a folder below it) holds at least one DICOM file."""
    return Path(folder).is_dir() and any(_is_dicom(p) for p in _files(Path(folder)))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def _is_dicom(path: Path) -> bool:
    """A DICOM Part 10 file: a 128-byte preamble, then ``DICM``."""
    with path.open("rb") as fh:
        head = fh.read(_PREAMBLE + len(_DICM))
    return head[_PREAMBLE:] == _DICM


def find_series(folder: Path) -> list[DicomSeries]:
    """Every series under ``folder``, each checked (see :func:`check`).

    Raises:
        InvalidScanError: the folder holds no DICOM file; a series cannot be used.
    """
    folder = Path(folder)
    headers = []
    for path in _files(folder):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError):
            continue
        if _is_image(path, ds):
            headers.append((path, ds))
    if not headers:
        raise InvalidScanError(
            folder,
            "the folder holds no DICOM files",
            "point at a folder of DICOM slices (one series, or several in sub-folders)",
        )
    groups: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    for path, ds in headers:
        groups[_group_key(ds)].append((path, ds))
    return [_series(folder, members) for _, members in sorted(groups.items())]


def _is_image(path: Path, ds: pydicom.Dataset) -> bool:
    """Whether a DICOM file is an image slice. A DICOMDIR, a structured report, a
    presentation state or a key-object note in an exported study folder is not one (it
    has no Rows), and is passed over rather than taken for a slice without geometry."""
    meta = ds.get("file_meta", pydicom.Dataset())
    if path.name.upper() == "DICOMDIR" or str(meta.get("MediaStorageSOPClassUID", "")) == _DICOMDIR:
        return False
    return "Rows" in ds


def _group_key(ds: pydicom.Dataset) -> str:
    uid = str(ds.get("SeriesInstanceUID", "") or "")
    if uid:
        return f"uid:{uid}"
    facts = (
        str(ds.get("StudyInstanceUID", "") or ""),
        str(ds.get("SeriesNumber", "") or ""),
        tuple(round(float(v), 3) for v in ds.get("ImageOrientationPatient", [])),
        tuple(round(float(v), 4) for v in ds.get("PixelSpacing", [])),
        int(ds.get("Rows", 0)),
        int(ds.get("Columns", 0)),
    )
    return "geometry:" + hashlib.sha256(repr(facts).encode()).hexdigest()[:12]


def _series(folder: Path, members: list[tuple[Path, pydicom.Dataset]]) -> DicomSeries:
    where = members[0][0].parent
    first = members[0][1]
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        missing = [p.name for p, ds in members if tag not in ds]
        if missing:
            raise InvalidScanError(
                where,
                f"{len(missing)} slice(s) lack {tag} (e.g. {missing[0]}), so the series has "
                "no geometry",
                "export the series again from the scanner or PACS with its geometry tags",
            )
    orientations = np.array([[float(v) for v in ds.ImageOrientationPatient] for _, ds in members])
    pixel = [float(v) for v in first.PixelSpacing]  # (between rows, between columns)
    _check_plane(where, members[0][0].name, orientations[0], pixel)
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        raise InvalidScanError(
            where,
            "the slices have different image orientations (ImageOrientationPatient), so "
            "they are not one stack",
            "separate the series (one folder per series, or per orientation)",
        )
    sizes = sorted({(int(ds.Columns), int(ds.Rows)) for _, ds in members})
    spacings = sorted({tuple(round(float(v), 4) for v in ds.PixelSpacing) for _, ds in members})
    if len(sizes) > 1 or len(spacings) > 1:
        what = (
            f"matrix sizes {' and '.join(f'{c} x {r}' for c, r in sizes)}"
            if len(sizes) > 1
            else f"pixel spacings {' and '.join(str(list(s)) for s in spacings)} mm"
        )
        raise InvalidScanError(
            where,
            f"the slices of one series have different {what}, so they are not one stack",
            "export the series again; keep reformatted or resized images in their own folder",
        )
    row, column = orientations[0][:3], orientations[0][3:]
    normal = np.cross(row, column)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in members])
    order = np.argsort(positions @ normal, kind="stable")
    members = [members[i] for i in order]
    positions = positions[order]
    meta = first.get("file_meta", pydicom.Dataset())
    syntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
    return DicomSeries(
        folder=where if len({p.parent for p, _ in members}) == 1 else folder,
        files=tuple(p for p, _ in members),
        series_uid=str(first.get("SeriesInstanceUID", "") or ""),
        positions=positions,
        row=row,
        column=column,
        spacing=(pixel[1], pixel[0]),
        shape=(int(first.Columns), int(first.Rows)),
        modality=str(first.get("Modality", "") or ""),
        transfer_syntax=syntax,
        image_type=tuple(str(v).upper() for v in (first.get("ImageType") or ())),
        unscaled=tuple(
            p.name for p, ds in members if "RescaleSlope" not in ds or "RescaleIntercept" not in ds
        ),
    )


def _check_plane(where: Path, name: str, orientation: np.ndarray, pixel: list[float]) -> None:
    """Refuse a pixel spacing that is not positive and finite, or row and column
    directions that are not orthogonal unit vectors: the slice has no usable geometry."""
    if len(pixel) != 2 or not all(np.isfinite(pixel)) or min(pixel) <= 0:  # noqa: PLR2004
        raise InvalidScanError(
            where,
            f"PixelSpacing is {pixel} mm (e.g. {name}); it must be two positive sizes",
            "export the series again from the scanner or PACS with its real pixel spacing",
        )
    row, column = orientation[:3], orientation[3:]
    unit = np.allclose([np.linalg.norm(row), np.linalg.norm(column)], 1.0, atol=1e-3)
    if len(orientation) != 6 or not unit or abs(float(row @ column)) > 1e-3:  # noqa: PLR2004
        raise InvalidScanError(
            where,
            f"ImageOrientationPatient {[round(float(v), 4) for v in orientation]} (e.g. "
            f"{name}) is not two orthogonal unit directions",
            "export the series again from the scanner or PACS with its real orientation",
        )


def check(series: DicomSeries, limits: CheckConfig | None = None) -> float:
    """Refuse a series liverpipe cannot read as one CT volume; returns the slice spacing.

    Raises:
        InvalidScanError: not CT; too few slices; two slices at one position (mixed
            series); gantry tilt; missing slices (irregular spacing).
    """
    limits = limits or CheckConfig()
    where = series.folder
    if series.modality != "CT":
        raise InvalidScanError(
            where,
            f"the series is {series.modality or 'of unknown modality'}, not CT (Modality tag)",
            "liverpipe segments CT only; pass the CT series of the study",
        )
    if "LOCALIZER" in series.image_type:
        raise InvalidScanError(
            where,
            f"the series is a localizer (scout: ImageType {'/'.join(series.image_type)}), "
            "not a CT volume",
            "pass the study's axial CT series; the localizer can stay beside it, where this "
            "message only names it",
        )
    if series.unscaled:
        raise InvalidScanError(
            where,
            f"{len(series.unscaled)} slice(s) lack RescaleSlope or RescaleIntercept (e.g. "
            f"{series.unscaled[0]}), which a CT image carries to turn its stored values "
            "into HU",
            "export the series again with its rescale tags; if the stored values already "
            "are HU, set RescaleSlope 1 and RescaleIntercept 0",
        )
    n = len(series.files)
    if n < limits.min_slices:
        raise InvalidScanError(
            where,
            f"the series has {n} slice(s), fewer than the {limits.min_slices} needed",
            "export the whole series, or lower [check] min_slices",
        )
    normal = np.cross(series.row, series.column)
    steps = np.diff(series.positions, axis=0)
    along = steps @ normal
    if (along < _SAME_POSITION_MM).any():
        k = int(np.argmax(along < _SAME_POSITION_MM))
        raise InvalidScanError(
            where,
            f"two slices lie at the same position ({series.files[k].name} and "
            f"{series.files[k + 1].name}): the folder mixes series or holds duplicates",
            "keep one series per folder (the anonymisation blanked the UIDs that would "
            "separate them)",
        )
    drift = np.linalg.norm(steps - along[:, None] * normal, axis=1)
    if drift.max() > TILT_TOLERANCE_MM:
        raise InvalidScanError(
            where,
            f"the slices are stacked at an angle to their planes (gantry tilt: "
            f"{drift.max():.2f} mm in-plane shift per slice)",
            "resample the series onto an orthogonal grid first (e.g. dcm2niix's tilt "
            "correction), or export the scanner's tilt-corrected reconstruction",
        )
    spacing = float(np.median(along))
    gaps = np.flatnonzero(along > spacing * (1 + GAP_TOLERANCE))
    if gaps.size or along.min() < spacing * (1 - GAP_TOLERANCE):
        k = int(gaps[0]) if gaps.size else int(np.argmin(along))
        raise InvalidScanError(
            where,
            f"the slice positions are irregular: {along[k]:.2f} mm between "
            f"{series.files[k].name} and {series.files[k + 1].name}, against "
            f"{spacing:.2f} mm elsewhere (missing slices?)",
            "export the complete series",
        )
    return spacing


def read_series(series: DicomSeries, limits: CheckConfig | None = None) -> nib.Nifti1Image:
    """The series as a NIfTI image in memory: voxels (column, row, slice), HU after
    RescaleSlope/Intercept (int16 when they are integral), affine in RAS+ mm."""
    spacing = check(series, limits)
    damaged = _damaged_slice(series)  # GDCM pads short pixel data without a word
    if damaged:
        raise InvalidScanError(
            series.folder, damaged, "export or copy the series again: the file is damaged"
        )
    try:
        image = sitk.ReadImage([str(p) for p in series.files])
    except RuntimeError as err:
        syntax = series.transfer_syntax
        name = pydicom.uid.UID(syntax).name if syntax else "unknown"
        raise InvalidScanError(
            series.folder,
            f"the pixel data cannot be decoded (transfer syntax {name}, {syntax}): {err}",
            "export the series uncompressed (Explicit VR Little Endian) or in a common "
            "compressed syntax (JPEG 2000, JPEG-LS)",
        ) from err
    voxels = sitk.GetArrayFromImage(image)  # (slice, row, column) in the files' order
    if voxels.shape[0] != len(series.files) or voxels.shape[1:] != series.shape[::-1]:
        raise InvalidScanError(
            series.folder,
            f"the decoded pixels have shape {voxels.shape}, not the headers' "
            f"{(len(series.files), *series.shape[::-1])}",
            "export the series again",
        )
    data = np.ascontiguousarray(voxels.transpose(2, 1, 0))  # (column, row, slice)
    if data.dtype.kind == "f" and np.array_equal(data, np.round(data)):
        if data.min() >= np.iinfo(np.int16).min and data.max() <= np.iinfo(np.int16).max:
            data = data.astype(np.int16)
    normal = np.cross(series.row, series.column)
    lps = np.eye(4)
    lps[:3, 0] = series.row * series.spacing[0]
    lps[:3, 1] = series.column * series.spacing[1]
    lps[:3, 2] = normal * spacing
    lps[:3, 3] = series.positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS
    out = nib.Nifti1Image(data, affine)
    out.set_sform(affine, code=1)
    out.set_qform(affine, code=1)
    out.header.set_xyzt_units("mm")
    return out


def _damaged_slice(series: DicomSeries) -> str | None:
    """What is wrong with the first slice that cannot be read to its end, has no pixel
    data, or holds fewer uncompressed pixel bytes than its rows, columns and bits need;
    None when every slice is whole. The pixel data are not read: their element's length
    and place in the file are enough."""
    for path in series.files:
        try:
            ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
        except Exception as err:  # pydicom raises many types on a cut file
            return f"{path.name} cannot be read to its end ({type(err).__name__}: {err})"
        if "PixelData" not in ds:
            return f"{path.name} has no pixel data (PixelData element)"
        if ds.file_meta.get("TransferSyntaxUID", pydicom.uid.ExplicitVRLittleEndian).is_compressed:
            continue
        need = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
        need *= int(ds.get("BitsAllocated", 16)) // 8
        element = ds.get_item("PixelData", keep_deferred=True)
        if isinstance(element, pydicom.dataelem.RawDataElement) and element.value is None:
            have = min(element.length, path.stat().st_size - element.value_tell)
        else:
            have = len(ds.PixelData)
        if have < need:
            return f"{path.name} is cut short: its pixel data holds {have} of {need} bytes"
    return None


def write_nifti(series: DicomSeries, out: Path, limits: CheckConfig | None = None) -> Path:
    """Write the series as a NIfTI file at ``out`` (atomically); returns ``out``."""
    image = read_series(series, limits)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{''.join(out.suffixes)}")
    nib.save(image, tmp)
    tmp.replace(out)
    return out
