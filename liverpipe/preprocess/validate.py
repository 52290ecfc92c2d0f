"""Validation of cases: header first, then data, then image/label agreement, then what
the stored grid would keep (thickness, in-plane field of view).

Every problem becomes one sentence naming the file, what is wrong and the fix.
``check_case`` never raises for bad input: it returns a :class:`CaseReport`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from liverpipe._system import available_cpus
from liverpipe.errors import (
    GeometryMismatchError,
    InvalidScanError,
    LabelValueError,
    LiverpipeError,
)
from liverpipe.geometry import CanonicalGeometry
from liverpipe.io import (
    CaseFiles,
    DatasetIndex,
    NiftiInfo,
    find_series,
    read_header,
    read_labels_hashed,
    read_voxels,
    write_nifti,
)
from liverpipe.labels import Label
from liverpipe.preprocess.fov import (
    FovReport,
    check_grid_size,
    check_thickness,
    crop_window,
    fov_findings,
    label_columns,
    needed_size,
    widen_to_body,
)
from liverpipe.preprocess.kernels import (
    BodyFootprint,
    Grid,
    body_footprint,
    canonical_view,
    fraction_outside,
    stored_grid,
)
from liverpipe.settings import CheckConfig, PreprocessConfig

__all__ = [
    "CaseReport",
    "check_affines_match",
    "check_case",
    "check_dataset",
    "check_hu_values",
    "check_image_values",
    "check_label_values",
    "check_series",
    "swapped_codes_finding",
]

T = TypeVar("T")
_VALID_LABELS = frozenset(int(v) for v in Label)
#: A "label" with more distinct values than this, reaching below this HU, is a scan.
_SCAN_LIKE_VALUES, _SCAN_LIKE_HU = 32, -100


@dataclass(frozen=True)
class CaseReport:
    """Outcome of checking one case; ``errors`` is empty when ``ok``."""

    case_id: str
    ok: bool
    errors: tuple[str, ...]
    shape: tuple[int, int, int] | None = None
    spacing: tuple[float, float, float] | None = None
    axcodes: str | None = None
    warnings: tuple[str, ...] = ()
    fov: dict[str, object] | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "case_id": self.case_id,
            "ok": self.ok,
            "errors": list(self.errors),
            "warnings": list(self.warnings),
            "fov": self.fov,
        }


def check_image_values(path: Path, data: np.ndarray) -> None:
    """Raise InvalidScanError when a float image holds NaN or infinite values."""
    if data.dtype.kind != "f" or np.isfinite(data.sum(dtype=np.float64)):
        return  # one pass, no temporary array; count only when something is wrong
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise InvalidScanError(
            path,
            f"{bad} voxels are NaN or infinite",
            "replace them with a valid HU value (e.g. -1024 for air) before ingest",
        )


def check_hu_values(path: Path, data: np.ndarray, max_lowest_hu: float | None) -> None:
    """Raise InvalidScanError when no voxel lies below ``max_lowest_hu``: the values are
    not HU, and the message says what they look like instead.

    A CT in HU holds fat and air (about -100 and -1000 HU). One strided look at every
    fourth voxel of each axis finds air in any real scan; the whole volume is read only
    when that look finds none.
    """
    if max_lowest_hu is None or data.size == 0:
        return
    if data[(slice(None, None, 4),) * data.ndim].min() < max_lowest_hu:
        return
    low = float(data.min())
    if low < max_lowest_hu:
        return
    raise InvalidScanError(path, *_not_hu(data, low, float(data.max()), max_lowest_hu))


#: Shapes of values that are not HU: bytes; z-scores or [0, 1] (lowest value near 0,
#: highest at most 50); HU + 1024 (air near 0, bone and contrast far above 500).
_BYTE_MAX, _NEAR_ZERO, _NORMALISED_MAX, _BONE_UNSCALED = 255, 10, 50, 500
_IN_HU = (
    "export the scan in Hounsfield units (DICOM: apply RescaleSlope and RescaleIntercept, "
    "as `liverpipe convert` does), or set scl_slope/scl_inter in the NIfTI header"
)
_REALLY_HU = "; if the scan really is in HU, lower or turn off [check] max_lowest_hu"


def _not_hu(data: np.ndarray, low: float, high: float, limit: float) -> tuple[str, str]:
    """(problem, fix) for values with no voxel below ``limit``: what they look like."""
    seen = f"no voxel is below {limit:g} HU (values {low:g} to {high:g})"
    if low == high:
        return f"every voxel is {low:g}: the scan is blank", "export or copy the scan again"
    integers = data.dtype.kind in "iu"
    if integers and low >= 0 and high <= max(_VALID_LABELS):
        found = ", ".join(f"{v:g}" for v in np.unique(data))
        return (
            f"{seen}: only the values {found}, as in a label map",
            "check that the image and the label are not swapped: the scan belongs in "
            "imagesTr/, its label under the same name in labelsTr/",
        )
    if integers and low >= 0 and high <= _BYTE_MAX:
        return f"{seen}: an 8-bit image (a windowed export), not HU", _IN_HU
    if abs(low) <= _NEAR_ZERO and high <= _NORMALISED_MAX:
        return f"{seen}: the values look normalised, not HU", _IN_HU + _REALLY_HU
    if low >= -_NEAR_ZERO and high >= _BONE_UNSCALED:
        return (
            f"{seen}: the values look stored without their rescale intercept (air at "
            f"{low:g} instead of about -1000; the intercept is usually -1024)",
            _IN_HU + _REALLY_HU,
        )
    return (
        f"{seen}, while a CT in HU holds fat (about -100) and air (about -1000)",
        _IN_HU + _REALLY_HU,
    )


def check_label_values(path: Path, data: np.ndarray) -> None:
    """Raise LabelValueError unless every voxel is an integral value in {0, 1, 2}.

    Runs over slabs of the last axis so that float labels never need a full-size
    temporary (the volume is Fortran-ordered from NIfTI, so slabs are contiguous).
    """
    step = max(1, (1 << 22) // max(1, data[..., 0].size))
    for k in range(0, data.shape[-1], step):
        _check_label_slab(path, data[..., k : k + step])


def _check_label_slab(path: Path, data: np.ndarray) -> None:
    if data.dtype.kind == "f":
        integral = np.isfinite(data) & (np.floor(data) == data)
        if not integral.all():
            odd = np.unique(data[~integral])[:5]
            raise LabelValueError(
                path,
                f"label values must be integers, found {', '.join(f'{v:g}' for v in odd)}",
                "round the label map to 0/1/2 (it may have been resampled with linear "
                "interpolation; use nearest neighbour)",
            )
    if data.size and (data.min() < 0 or data.max() > max(_VALID_LABELS)):
        values = np.unique(data)
        if values.size > _SCAN_LIKE_VALUES and values[0] < _SCAN_LIKE_HU:
            raise LabelValueError(
                path,
                f"label values must be 0 (background), 1 (liver) or 2 (tumour), found "
                f"{values.size} distinct values, from {values[0]:g} to {values[-1]:g}: this "
                "looks like a CT scan in HU, not a label",
                "check that the file in labelsTr/ is the label of the scan of the same name in "
                "imagesTr/ (the two may be swapped)",
            )
        extra = [f"{v:g}" for v in values if int(v) not in _VALID_LABELS][:8]
        raise LabelValueError(
            path,
            f"label values must be 0 (background), 1 (liver) or 2 (tumour), found {', '.join(extra)}",
            "map the other values to 0/1/2 (e.g. several tumour ids to 2) before ingest",
        )


def swapped_codes_finding(path: Path, label: np.ndarray) -> str | None:
    """A warning when a validated label's liver (1) and tumour (2) codes look swapped.

    A tumour lies in the liver: most of the liver's surface meets the background, little
    of the tumour's does. The warning needs both signs of a swap: more tumour than liver,
    and more tumour surface than liver surface against the background (counted on the
    label's own grid; surfaces only when the counts already disagree).
    """
    liver = int(np.count_nonzero(label == Label.LIVER))
    tumour = int(np.count_nonzero(label == Label.TUMOUR))
    if tumour <= liver:
        return None
    liver_faces, tumour_faces = (
        _faces_with_background(label, code) for code in (Label.LIVER, Label.TUMOUR)
    )
    if tumour_faces <= liver_faces:
        return None
    return (
        f"{path}: the label has more tumour (2: {tumour} voxels) than liver (1: {liver}), "
        f"and the tumour meets the background on {tumour_faces} voxel faces where the "
        f"liver does on {liver_faces}: the liver and tumour codes look swapped, which "
        "would train the models to call the liver tumour. Fix: remap the label (liver 1, "
        "tumour 2); if it is right (a liver mostly replaced by tumour), ignore this warning."
    )


def _faces_with_background(label: np.ndarray, code: int) -> int:
    """Voxel faces where ``code`` meets background (0), over the three axes."""
    faces = 0
    for axis in range(label.ndim):
        a = np.moveaxis(label, axis, 0)
        lo, hi = a[:-1], a[1:]
        faces += int(np.count_nonzero((lo == code) & (hi == 0)))
        faces += int(np.count_nonzero((hi == code) & (lo == 0)))
    return faces


def check_affines_match(image: NiftiInfo, label: NiftiInfo, tolerance_mm: float) -> None:
    """Raise GeometryMismatchError unless image and label share shape and voxel grid.

    The grids agree when every corner voxel of the volume lands within ``tolerance_mm``
    of the same world point under both affines.
    """
    if image.shape != label.shape:
        raise GeometryMismatchError(
            label.path,
            f"label shape {label.shape} differs from image shape {image.shape} ({image.path.name})",
            "resample the label onto the image grid with nearest-neighbour interpolation",
        )
    corners = np.array(list(product(*[(0, n - 1) for n in image.shape])), dtype=np.float64)
    corners = np.c_[corners, np.ones(len(corners))]
    gap = float(np.abs(corners @ image.affine.T - corners @ label.affine.T)[:, :3].max())
    if gap > tolerance_mm:
        raise GeometryMismatchError(
            label.path,
            f"label grid is {gap:.4g} mm away from the image grid ({image.path.name}); "
            f"the tolerance is {tolerance_mm:g} mm",
            "copy the image's affine into the label header if the voxels correspond, "
            "otherwise resample the label onto the image grid",
        )


def check_case(
    case: CaseFiles,
    limits: CheckConfig | None = None,
    preprocess: PreprocessConfig | None = None,
) -> CaseReport:
    """Validate one case as preprocessing would: headers, voxel data, image/label
    agreement, thickness and the stored crop's field of view (``preprocess`` gives the
    stored grid; defaults apply when it is None)."""
    limits = limits or CheckConfig()
    preprocess = preprocess or PreprocessConfig()
    errors = list(case.problems)
    image = _guard(errors, read_header, case.image, limits) if case.image else None
    label = _guard(errors, read_header, case.label, limits) if case.label else None
    coverage = None
    if image is not None:
        coverage = _guard(errors, _image_coverage, image, preprocess, limits)
    label_columns_: np.ndarray | None = None
    label_warnings: list[str] = []
    if label is not None:
        found_label = _guard(errors, _label_columns, label, coverage)
        if found_label is not None:
            label_columns_, label_warnings = found_label
    if image is not None and label is not None:
        _guard(errors, check_affines_match, image, label, limits.affine_tolerance_mm)
    warnings = [*(image.warnings if image else ()), *(label.warnings if label else ())]
    warnings += label_warnings
    fov = None
    if coverage is not None and image is not None:
        body, geometry, grid = coverage
        window = crop_window(geometry, grid)
        outside = None if label_columns_ is None else fraction_outside(label_columns_, window)
        voxels = None if label_columns_ is None else int(label_columns_.sum())
        fov = FovReport(
            body.fraction_outside(window),
            outside,
            needed_size(body, geometry, grid),
            voxels,
            body.columns is not None,
        )
        label_path = label.path if label is not None else None
        found = _guard(errors, fov_findings, image.path, fov, preprocess, limits, label_path)
        warnings += found or []
    return CaseReport(
        case.case_id,
        not errors,
        tuple(errors),
        image.shape if image else None,
        image.spacing if image else None,
        "".join(image.axcodes) if image else None,
        tuple(dict.fromkeys(warnings)),
        fov.to_json() if fov else None,
    )


def _image_coverage(
    image: NiftiInfo, preprocess: PreprocessConfig, limits: CheckConfig
) -> tuple[BodyFootprint, CanonicalGeometry, Grid]:
    """Read and check the voxels; the body footprint and the stored grid of the scan."""
    data = read_voxels(image)
    check_image_values(image.path, data)
    geometry = CanonicalGeometry.of(image.shape, image.affine)
    check_thickness(image, geometry, preprocess, limits)
    check_hu_values(image.path, data, limits.max_lowest_hu)
    body = body_footprint(canonical_view(data, geometry), preprocess.body_threshold_hu)
    grid = stored_grid(geometry, body.centre, preprocess)
    check_grid_size(image.path, grid, limits)
    if body.fraction_outside(crop_window(geometry, grid)) > 0:  # prediction widens the grid
        check_grid_size(image.path, widen_to_body(geometry, grid, body)[0], limits)
    return body, geometry, grid


def _label_columns(
    label: NiftiInfo, coverage: tuple[BodyFootprint, CanonicalGeometry, Grid] | None
) -> tuple[np.ndarray | None, list[str]]:
    """Check the label values; its per-column counts on the image's canonical grid (None
    without one) and its warnings."""
    data, _ = read_labels_hashed(label, lambda values: check_label_values(label.path, values))
    found = swapped_codes_finding(label.path, data)
    warnings = [found] if found else []
    if coverage is None or data.shape != coverage[1].original_shape:
        return None, warnings
    return label_columns(canonical_view(data, coverage[1])), warnings


def check_dataset(
    index: DatasetIndex,
    limits: CheckConfig | None = None,
    preprocess: PreprocessConfig | None = None,
) -> Iterator[CaseReport]:
    """Check every case with a thread pool (decompression releases the GIL); yields in order."""
    limits = limits or CheckConfig()
    workers = limits.workers or available_cpus()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(lambda c: check_case(c, limits, preprocess), index.cases)


def _guard(errors: list[str], step: Callable[..., T], *args: Any) -> T | None:
    """Run one check; a LiverpipeError becomes an error sentence instead of propagating."""
    try:
        return step(*args)
    except LiverpipeError as err:
        errors.append(str(err))
        return None


def check_series(
    folder: Path, limits: CheckConfig | None = None, preprocess: PreprocessConfig | None = None
) -> list[CaseReport]:
    """``liverpipe check`` for a folder of DICOM series: each series is read and checked
    as a series, then as the NIfTI it becomes (header, values, thickness, field of view)."""
    limits = limits or CheckConfig()
    try:
        found = find_series(folder)
    except LiverpipeError as err:
        return [CaseReport(Path(folder).name, False, (str(err),))]
    reports = []
    with tempfile.TemporaryDirectory(prefix="liverpipe-dicom-") as tmp:
        for series in found:
            try:
                scan = write_nifti(series, Path(tmp) / f"{series.name}.nii.gz", limits)
            except LiverpipeError as err:
                reports.append(CaseReport(series.name, False, (str(err),)))
                continue
            report = check_case(CaseFiles(series.name, scan, None, "test"), limits, preprocess)
            reports.append(
                replace(
                    report,
                    errors=_named(report.errors, scan, series.folder),
                    warnings=_named(report.warnings, scan, series.folder),
                )
            )
    return reports


def _named(messages: tuple[str, ...], scan: Path, folder: Path) -> tuple[str, ...]:
    """Messages about the temporary NIfTI, naming the series folder instead."""
    return tuple(m.replace(str(scan), str(folder)) for m in messages)
