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
from typing import Literal

import numpy as np
import SimpleITK as sitk

from liverpipe import __version__
from liverpipe._system import release_free_memory
from liverpipe.errors import LiverpipeError
from liverpipe.io import read_header, read_voxels
from liverpipe.preprocess.forward import forward_case
from liverpipe.preprocess.kernels import ZScoreStats, slice_counts
from liverpipe.settings import CheckConfig, PreprocessConfig
from storage import CaseMeta, SliceStore

__all__ = ["CaseJob", "CaseResult", "combine_hashes", "foreground_histogram", "ingest_case"]

HIST_LOW, HIST_HIGH = -1024, 3072  # 1 HU bins for dataset statistics
HIST_BINS = HIST_HIGH - HIST_LOW


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
    split: Literal["train", "val", "test"] = "train"
    identity: dict[str, list[int]] | None = None  # the files' identities when planned


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
    warnings: tuple[str, ...] = ()
    permanent: bool = False  # a failure that the same input files will always give


def combine_hashes(image_sha: str, label_sha: str | None) -> str:
    """One source hash for a case: sha256 over the image and label file hashes."""
    return hashlib.sha256(f"image:{image_sha};label:{label_sha or '-'}".encode()).hexdigest()


def ingest_case(job: CaseJob) -> CaseResult:
    """Validate and preprocess one case into the store; failures become results.

    The worker hands the case's freed memory back to the OS when it is done: within the
    case the allocator reuses it (see ``liverpipe.preprocess.parallel``), between cases
    the worker stays small."""
    try:
        return _ingest_case(job)
    finally:
        release_free_memory()


def _ingest_case(job: CaseJob) -> CaseResult:
    start = time.perf_counter()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(job.threads)
    source_sha = ""
    try:
        meta, image, label, warnings = _preprocess(job)
        source_sha = meta.source_sha256
        SliceStore.open(job.store).write_case(meta, image, label)
    except LiverpipeError as err:  # bad input: retrying the same files gives the same error
        return CaseResult(
            job.case_id,
            False,
            source_sha,
            error=str(err),
            seconds=time.perf_counter() - start,
            permanent=True,
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
        warnings=warnings,
    )


def _preprocess(job: CaseJob) -> tuple[CaseMeta, np.ndarray, np.ndarray, tuple[str, ...]]:
    case = forward_case(job.image, job.label, job.config, job.zscore, job.limits)
    label = case.label if case.label is not None else np.zeros(case.grid.shape, dtype=np.uint8)
    meta = CaseMeta(
        case_id=job.case_id,
        shape=case.grid.shape,
        spacing=case.grid.spacing,
        affine=tuple(tuple(float(v) for v in row) for row in case.grid.affine),
        original_shape=case.info.shape,
        original_affine=tuple(tuple(float(v) for v in row) for row in case.info.affine),
        crop_offset=case.grid.crop_offset,
        source_sha256=combine_hashes(case.image_sha256, case.label_sha256),
        config_hash=job.config_hash,
        slice_counts=slice_counts(label),
        hu_stats=case.hu_stats,
        intensity=case.intensity,
        source_image=str(job.image),
        source_label=str(job.label) if job.label else None,
        affine_source=case.info.affine_source,
        fov=case.fov.to_json(),
        extra={"liverpipe_version": __version__, "axcodes": "".join(case.info.axcodes)},
    )
    return meta, case.image, label, case.warnings


def foreground_histogram(job: CaseJob) -> np.ndarray:
    """HU histogram (1 HU bins, -1024..3071) of a case's labelled voxels, for z-score stats."""
    if job.label is None:
        return np.zeros(HIST_BINS, dtype=np.int64)
    image_info, label_info = read_header(job.image, job.limits), read_header(job.label, job.limits)
    data, label = read_voxels(image_info), read_voxels(label_info)
    values = np.clip(np.rint(data[label > 0]), HIST_LOW, HIST_HIGH - 1).astype(np.int64) - HIST_LOW
    return np.bincount(values, minlength=HIST_BINS)
