"""One case, end to end: validate, preprocess, write into the store.

``ingest_case`` is what a Dask (or Prefect) task runs: it takes a small picklable
:class:`CaseJob`, writes the case into the store itself and returns a small
:class:`CaseResult`, never arrays. Bad input becomes a failed result, never an exception.
"""

from __future__ import annotations

import hashlib
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from liverpipe import __version__
from liverpipe.errors import LiverpipeError
from liverpipe.geometry import CanonicalGeometry
from liverpipe.nifti import read_header, read_voxels, read_voxels_hashed
from liverpipe.preprocess import (
    ZScoreStats,
    body_centre,
    canonical_view,
    encode,
    hu_statistics,
    normalize_ct,
    resample_image,
    resample_label,
    slice_counts,
    stored_grid,
    zscore_ct,
)
from liverpipe.settings import CheckConfig, PreprocessConfig
from liverpipe.validate import check_affines_match, check_image_values, check_label_values
from storage import CaseMeta, Intensity, SliceStore

__all__ = ["CaseJob", "CaseResult", "combine_hashes", "foreground_histogram", "ingest_case"]

HIST_LOW, HIST_HIGH = -1024, 3072  # 1 HU bins for dataset statistics


@dataclass(frozen=True)
class CaseJob:
    """Everything one task needs; small and picklable."""

    case_id: str
    image: Path
    label: Path | None
    store: Path
    config: PreprocessConfig
    config_hash: str
    zscore: ZScoreStats | None = None
    threads: int = 1
    limits: CheckConfig = field(default_factory=CheckConfig)


@dataclass(frozen=True)
class CaseResult:
    """What a task returns: status, provenance and timings (no arrays)."""

    case_id: str
    ok: bool
    source_sha256: str
    shape: tuple[int, int, int] | None = None
    error: str | None = None
    seconds: float = 0.0
    peak_rss_mb: float = 0.0


def combine_hashes(image_sha: str, label_sha: str | None) -> str:
    """One source hash for a case: sha256 over the image and label file hashes."""
    return hashlib.sha256(f"image:{image_sha};label:{label_sha or '-'}".encode()).hexdigest()


def ingest_case(job: CaseJob) -> CaseResult:
    """Validate and preprocess one case into the store; failures become results."""
    start = time.perf_counter()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(job.threads)
    source_sha = ""
    try:
        meta, image, label = _preprocess(job)
        source_sha = meta.source_sha256
        SliceStore.open(job.store).write_case(meta, image, label)
    except LiverpipeError as err:
        return CaseResult(
            job.case_id, False, source_sha, error=str(err), seconds=time.perf_counter() - start
        )
    except Exception as err:  # a bug or an unreadable oddity: keep the other cases going
        message = f"{job.image}: unexpected {type(err).__name__}: {err}. Fix: report this with the file's header (nib-ls)."
        return CaseResult(
            job.case_id, False, source_sha, error=message, seconds=time.perf_counter() - start
        )
    return CaseResult(
        job.case_id,
        True,
        meta.source_sha256,
        meta.shape,
        seconds=time.perf_counter() - start,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


def _preprocess(job: CaseJob) -> tuple[CaseMeta, np.ndarray, np.ndarray]:
    cfg = job.config
    image_info = read_header(job.image, job.limits)
    label_info = read_header(job.label, job.limits) if job.label else None
    if label_info is not None:
        check_affines_match(image_info, label_info, job.limits.affine_tolerance_mm)
    data, image_sha = read_voxels_hashed(image_info)
    check_image_values(image_info.path, data)
    geometry = CanonicalGeometry.of(image_info.shape, image_info.affine)
    canonical = canonical_view(data, geometry)  # a view: resampled slab by slab
    grid = stored_grid(geometry, body_centre(canonical, cfg.body_threshold_hu), cfg)
    hu = resample_image(canonical, geometry.canonical_affine, grid, cfg.image_interpolation)
    del data, canonical
    label_sha = None
    label = np.zeros(grid.shape, dtype=np.uint8)
    if label_info is not None:
        label_data, label_sha = read_voxels_hashed(label_info)
        check_label_values(label_info.path, label_data)
        label_data = label_data.astype(
            np.uint8, copy=False
        )  # validated 0/1/2: free float labels now
        label = resample_label(
            canonical_view(label_data, geometry),
            geometry.canonical_affine,
            grid,
            cfg.label_interpolation,
        )
        del label_data
    stats = hu_statistics(hu, label if label_info else None, cfg.body_threshold_hu)
    stored, intensity = normalise(hu, cfg, job.zscore)
    meta = CaseMeta(
        case_id=job.case_id,
        shape=grid.shape,
        spacing=grid.spacing,
        affine=tuple(tuple(float(v) for v in row) for row in grid.affine),
        original_shape=image_info.shape,
        original_affine=tuple(tuple(float(v) for v in row) for row in image_info.affine),
        crop_offset=grid.crop_offset,
        source_sha256=combine_hashes(image_sha, label_sha),
        config_hash=job.config_hash,
        slice_counts=slice_counts(label),
        hu_stats=stats,
        intensity=intensity,
        source_image=str(job.image),
        source_label=str(job.label) if job.label else None,
        extra={"liverpipe_version": __version__, "axcodes": "".join(image_info.axcodes)},
    )
    return meta, stored, label


def normalise(
    hu: np.ndarray, cfg: PreprocessConfig, zscore: ZScoreStats | None
) -> tuple[np.ndarray, Intensity]:
    if cfg.normalization == "window":
        low, high = cfg.hu_window
        normalised = normalize_ct(hu, cfg.hu_window)
        stored, scale, offset = encode(normalised, cfg.storage_dtype, (0.0, 1.0))
        return stored, Intensity("window", cfg.storage_dtype, scale, offset, high - low, low)
    if zscore is None:
        raise ValueError("normalization='zscore' needs dataset statistics")
    normalised = zscore_ct(hu, zscore)
    value_range = (
        (zscore.low - zscore.mean) / zscore.std,
        (zscore.high - zscore.mean) / zscore.std,
    )
    stored, scale, offset = encode(normalised, cfg.storage_dtype, value_range)
    return stored, Intensity("zscore", cfg.storage_dtype, scale, offset, zscore.std, zscore.mean)


def foreground_histogram(job: CaseJob) -> np.ndarray:
    """HU histogram (1 HU bins, -1024..3071) of a case's labelled voxels, for z-score stats."""
    if job.label is None:
        return np.zeros(HIST_HIGH - HIST_LOW, dtype=np.int64)
    image_info, label_info = read_header(job.image, job.limits), read_header(job.label, job.limits)
    data, label = read_voxels(image_info), read_voxels(label_info)
    values = np.clip(np.rint(data[label > 0]), HIST_LOW, HIST_HIGH - 1).astype(np.int64) - HIST_LOW
    return np.bincount(values, minlength=HIST_HIGH - HIST_LOW)
