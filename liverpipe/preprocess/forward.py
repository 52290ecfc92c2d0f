"""The forward path: one function from a scan file to what a model sees.

Preprocessing (``ingest``) and prediction (``inference``) both call :func:`forward_case`,
so a model is fed at prediction time exactly what it was trained on:

1. read the header and the voxels (``nifti``), value checks (``validate``);
2. canonical geometry (``geometry``), refuse scans too thin for the stored grid;
3. the body's footprint, the stored grid centred on it, the field-of-view report;
4. resample the image (and the label) onto the grid, HU statistics;
5. normalise and encode as the store keeps it.

Prediction may ask for the whole body (``cover_body``): the grid is then widened on the
store's own lattice, so the store's window is an exact sub-array of it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from liverpipe.errors import ConfigError, InvalidScanError, LiverpipeError
from liverpipe.geometry import CanonicalGeometry
from liverpipe.io import NiftiInfo, read_header, read_labels_hashed, read_voxels_hashed
from liverpipe.preprocess.fov import (
    FovReport,
    check_grid_size,
    check_thickness,
    crop_window,
    fov_findings,
    needed_size,
    widen_to_body,
)
from liverpipe.preprocess.kernels import (
    Grid,
    LabelSupport,
    ZScoreStats,
    body_footprint,
    canonical_view,
    crop_to_labels,
    encode,
    fraction_outside,
    hu_statistics,
    normalize_ct,
    resample_image,
    resample_label,
    stored_grid,
    zscore_ct,
)
from liverpipe.preprocess.validate import (
    check_affines_match,
    check_hu_values,
    check_image_values,
    check_label_values,
    swapped_codes_finding,
)
from liverpipe.settings import CheckConfig, PreprocessConfig
from storage import Intensity

__all__ = [
    "ForwardCase",
    "decode",
    "forward_case",
    "normalise",
]


@dataclass(frozen=True, eq=False)
class ForwardCase:
    """A scan (and its label) on its grid, encoded as the store keeps it.

    ``image`` is (Z, Y, X) float16 or uint8; :meth:`decoded` gives the float32 values a
    model sees. ``window`` is the (Y, X) part of ``grid`` that the store's grid covers
    (all of it unless prediction widened the grid to cover the body).
    """

    info: NiftiInfo
    geometry: CanonicalGeometry
    grid: Grid
    image: np.ndarray
    intensity: Intensity
    label: np.ndarray | None
    label_info: NiftiInfo | None
    image_sha256: str
    label_sha256: str | None
    hu_stats: dict[str, float]
    fov: FovReport
    window: tuple[slice, slice]
    warnings: tuple[str, ...]
    source: np.ndarray | None = None

    def decoded(self) -> np.ndarray:
        """(Z, Y, X) float32 normalised values: the model's input."""
        return decode(self.image, self.intensity)


def decode(stored: np.ndarray, intensity: Intensity) -> np.ndarray:
    """Stored image values -> normalised float32 values (as the trainer decodes them)."""
    return stored.astype(np.float32) * np.float32(intensity.stored_scale) + np.float32(
        intensity.stored_offset
    )


def normalise(
    hu: np.ndarray, cfg: PreprocessConfig, zscore: ZScoreStats | None, slab: int = 32
) -> tuple[np.ndarray, Intensity]:
    """HU (Z, Y, X) -> the stored encoding and its :class:`Intensity`, ``slab`` slices at
    a time in float32 (no float32 copy of the whole volume)."""
    if cfg.normalization == "zscore" and zscore is None:
        raise ConfigError(
            None,
            "normalization = 'zscore' needs the dataset's foreground statistics",
            "preprocess through `liverpipe preprocess`, or pass the store's zscore record",
        )
    if cfg.normalization == "window":
        low, high = cfg.hu_window
        value_range = (0.0, 1.0)
        intensity = Intensity("window", cfg.storage_dtype, 1.0, 0.0, high - low, low)
    else:
        assert zscore is not None
        value_range = (
            (zscore.low - zscore.mean) / zscore.std,
            (zscore.high - zscore.mean) / zscore.std,
        )
        intensity = Intensity("zscore", cfg.storage_dtype, 1.0, 0.0, zscore.std, zscore.mean)
    stored = np.empty(hu.shape, dtype=np.dtype(cfg.storage_dtype))
    scale, offset = 1.0, 0.0
    for z0 in range(0, hu.shape[0], slab):
        part = hu[z0 : z0 + slab].astype(np.float32)
        part = normalize_ct(part, cfg.hu_window) if zscore is None else zscore_ct(part, zscore)
        stored[z0 : z0 + slab], scale, offset = encode(part, cfg.storage_dtype, value_range)
    return stored, replace(intensity, stored_scale=scale, stored_offset=offset)


def forward_case(
    image_path: Path,
    label_path: Path | None,
    config: PreprocessConfig,
    zscore: ZScoreStats | None = None,
    limits: CheckConfig | None = None,
    *,
    cover_body: bool = False,
    keep_source: bool = False,
) -> ForwardCase:
    """Read, validate, resample and normalise one scan (and its label) onto its grid.

    ``cover_body`` (prediction) widens the grid in-plane when the body reaches beyond
    the stored crop; ``keep_source`` keeps the decoded file voxels (for overlays).

    Raises:
        InvalidScanError, LabelValueError, GeometryMismatchError: the files cannot be
            used; the message names the file, the problem and the fix.
    """
    try:
        return _forward_case(
            image_path, label_path, config, zscore, limits, cover_body, keep_source=keep_source
        )
    except LiverpipeError:
        raise
    except (RuntimeError, ValueError, ArithmeticError, IndexError) as err:
        # SimpleITK and numpy on a header that passed every check but still makes no sense
        raise InvalidScanError(
            image_path,
            f"the scan cannot be resampled onto the stored grid ({type(err).__name__}: {err})",
            "check its geometry (`nib-ls -H FILE`: pixdim, qform, sform); if it looks right, "
            "report this with that output",
        ) from err


def _forward_case(
    image_path: Path,
    label_path: Path | None,
    config: PreprocessConfig,
    zscore: ZScoreStats | None,
    limits: CheckConfig | None,
    cover_body: bool,
    *,
    keep_source: bool,
) -> ForwardCase:
    limits = limits or CheckConfig()
    image_info = read_header(image_path, limits)
    label_info = read_header(label_path, limits) if label_path is not None else None
    if label_info is not None:
        check_affines_match(image_info, label_info, limits.affine_tolerance_mm)
    data, image_sha = read_voxels_hashed(image_info)
    check_image_values(image_info.path, data)
    geometry = CanonicalGeometry.of(image_info.shape, image_info.affine)
    check_thickness(image_info, geometry, config, limits)
    check_hu_values(image_info.path, data, limits.max_lowest_hu)
    canonical = canonical_view(data, geometry)  # a view: resampled slab by slab
    body = body_footprint(canonical, config.body_threshold_hu)
    grid = stored_grid(geometry, body.centre, config)
    check_grid_size(image_info.path, grid, limits)
    window = crop_window(geometry, grid)
    body_outside = body.fraction_outside(window)
    model_grid, yx = grid, (slice(0, grid.shape[1]), slice(0, grid.shape[2]))
    if cover_body and body_outside > 0:
        model_grid, yx = widen_to_body(geometry, grid, body)
        check_grid_size(image_info.path, model_grid, limits)
    hu = resample_image(
        canonical,
        geometry.canonical_affine,
        model_grid,
        config.image_interpolation,
        dtype=np.float16,
    )
    source = data if keep_source else None
    del data, canonical
    label, label_sha, label_outside, label_voxels = None, None, None, None
    warnings = list(image_info.warnings)
    if label_info is not None:
        label, label_sha, label_outside, label_voxels, found = _forward_label(
            label_info, geometry, model_grid, window, config
        )
        warnings += [*label_info.warnings, *found]
    fov = FovReport(
        body_outside,
        label_outside,
        needed_size(body, geometry, grid),
        label_voxels,
        body.columns is not None,
    )
    label_path = label_info.path if label_info is not None else None
    warnings += fov_findings(image_info.path, fov, config, limits, label_path)
    stats = hu_statistics(hu, label, config.body_threshold_hu)
    stored, intensity = normalise(hu, config, zscore)
    return ForwardCase(
        image_info,
        geometry,
        model_grid,
        stored,
        intensity,
        label,
        label_info,
        image_sha,
        label_sha,
        stats,
        fov,
        yx,
        tuple(dict.fromkeys(warnings)),
        source,
    )


def _forward_label(
    info: NiftiInfo,
    geometry: CanonicalGeometry,
    grid: Grid,
    window: tuple[float, float, float, float],
    config: PreprocessConfig,
) -> tuple[np.ndarray, str, float, int, list[str]]:
    """The label on ``grid`` (uint8), its file hash, its fraction outside ``window``, its
    count of labelled voxels on the scan's grid and its warnings."""
    data, sha = read_labels_hashed(info, lambda values: check_label_values(info.path, values))
    canonical = canonical_view(data, geometry)
    support = LabelSupport.of(canonical)  # one pass: the columns and the crop's box
    outside, voxels = fraction_outside(support.columns, window), int(support.columns.sum())
    cropped = crop_to_labels(canonical, geometry.canonical_affine, support=support)
    del data, canonical  # only the labelled part is kept from here on
    if cropped is None:
        return np.zeros(grid.shape, dtype=np.uint8), sha, outside, voxels, []
    crop, affine = cropped
    found = swapped_codes_finding(info.path, crop)
    resampled = resample_label(crop, affine, grid, config.label_interpolation)
    return resampled, sha, outside, voxels, [found] if found else []
