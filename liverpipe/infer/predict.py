"""Predict liver and tumour masks for new scans with one trained cascade or an ensemble.

A model folder (``liverpipe.models.runs``) holds the liver stage and the tumour stage, each a run
with ``config.json`` (stage, settings, the preprocessing of its store) and
``best.pt``/``last.pt``. Stage 1 finds the liver, stage 2 segments liver and tumour in its
ROI (``liverpipe.infer.cascade``). The mask is written on the input's grid with
its exact header (shape, affine, qform/sform codes), as uint8, with a measurements JSON
beside it.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from liverpipe._files import file_in_the_way
from liverpipe.errors import LiverpipeError
from liverpipe.infer.cascade import StageModels, decide, liver_stage, tumour_stage
from liverpipe.infer.measure import measure
from liverpipe.infer.volume import PreparedScan, native_labels, prepare_scan, tta_flips
from liverpipe.io import (
    DicomSeries,
    NiftiInfo,
    case_id_of,
    find_series,
    holds_dicom,
    is_nifti,
    write_nifti,
    write_seg,
)
from liverpipe.models import Cascade, Run
from liverpipe.settings import TUMOUR_SEED, TUMOUR_THRESHOLD

__all__ = [
    "PostProcess",
    "Predictor",
    "StagePrediction",
    "check_output",
    "predict_dicom",
    "predict_file",
    "predict_path",
    "write_labels",
]


@dataclass(frozen=True)
class PostProcess:
    """Post-processing steps on the native grid; each can be switched off."""

    largest_liver: bool = True
    tumour_in_liver: bool = True
    min_lesion_mm3: float = 0.0  # tumour components smaller than this become liver
    #: Tumour components whose tumour probability never reaches this become liver
    #: (hysteresis: confident lesions kept whole, faint blobs dropped); 0 turns it off.
    tumour_seed: float = TUMOUR_SEED
    #: Tumour where its probability reaches this (the extent of a seeded lesion); None:
    #: each tumour stage's val-tuned threshold (``result.json``), averaged over an ensemble.
    tumour_threshold: float | None = TUMOUR_THRESHOLD

    def describe(self) -> str:
        """The tumour decision rule, in words (the report states it)."""
        threshold = (
            "each tumour stage's val-tuned threshold"
            if self.tumour_threshold is None
            else f"{self.tumour_threshold:g}"
        )
        seed = (
            f", in lesions whose tumour probability reaches {self.tumour_seed:g} somewhere "
            "(the rest becomes liver)"
            if self.tumour_seed > 0
            else ""
        )
        return f"tumour where its probability reaches {threshold}{seed}"


@dataclass(frozen=True, eq=False)
class StagePrediction:
    """A scan's prediction by stage 1 alone and by the cascade, as native labels."""

    scan: PreparedScan
    liver: np.ndarray  # stage 1 alone, post-processed, file (i, j, k) order
    cascade: np.ndarray  # the cascade, post-processed, file (i, j, k) order
    warnings: list[str]


@dataclass
class Predictor:
    """One cascade or an ensemble of them (mean softmax per stage), with optional flip TTA."""

    cascades: Sequence[Cascade]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tta: bool = False
    post: PostProcess = field(default_factory=PostProcess)

    def __post_init__(self) -> None:
        if not self.cascades:
            raise ValueError("at least one model is needed")
        _check_ensemble([c.liver for c in self.cascades], "liver")
        tumours = [c.tumour for c in self.cascades]
        if any(t is None for t in tumours) and not all(t is None for t in tumours):
            raise LiverpipeError(
                self.cascades[0].liver.run_dir.parent,
                "some models have a tumour stage and some do not, so they cannot be ensembled",
                "ensemble models trained alike (`liverpipe train-all` trains both stages)",
            )
        if all(t is not None for t in tumours):
            _check_ensemble([t for t in tumours if t is not None], "tumour")
            if tumours[0] is not None and (
                tumours[0].store_config_hash != self.cascades[0].liver.store_config_hash
            ):
                raise LiverpipeError(
                    tumours[0].run_dir,
                    f"its store differs from the liver stage's ({tumours[0].store_config_hash} "
                    f"vs {self.cascades[0].liver.store_config_hash}), so they are not a pair",
                    "retrain both stages on one store (`liverpipe train-all`)",
                )
        if self.tta and self._flips("liver") == [()]:
            raise LiverpipeError(
                self.cascades[0].liver.run_dir,
                "test-time augmentation averages the flips the model trained with, and "
                "these runs share none ([train.augment] flip_axes)",
                "predict without --tta, or retrain with flip_axes = ['lr', 'ap']",
            )

    @property
    def version(self) -> dict[str, Any]:
        """Which trained models make the masks: the versioned runs (``RUNS/<run_id>``)
        and each cascade's ``<run_id>/<model>`` (its folder outside a versioned run)."""
        run_ids = sorted({c.run_id for c in self.cascades if c.run_id})
        return {"run_ids": run_ids, "models": [c.version for c in self.cascades]}

    @property
    def runs(self) -> list[Run]:
        """Every run of every stage, liver stages first."""
        tumours = [c.tumour for c in self.cascades if c.tumour is not None]
        return [c.liver for c in self.cascades] + tumours

    @property
    def tta_flips(self) -> list[tuple[int, ...]]:
        """The flips TTA averages in stage 1 (stage 2 likewise with its own runs)."""
        return self._flips("liver")

    def _flips(self, stage: str) -> list[tuple[int, ...]]:
        runs = [r for r in self.runs if r.stage == stage]
        if not self.tta or not runs:
            return [()]
        axes = set.intersection(*(set(r.train.augment.flip_axes) for r in runs))
        return tta_flips(tuple(sorted(axes)))

    def stages(self) -> tuple[StageModels, StageModels | None]:
        """The two stages' models as the cascade runs them."""
        first = self.cascades[0].liver
        liver = StageModels(
            [c.liver.model for c in self.cascades],
            first.train.context_slices,
            self._flips("liver"),
            downsample=first.train.downsample,
        )
        tumours = [c.tumour for c in self.cascades if c.tumour is not None]
        if not tumours:
            return liver, None
        tumour = StageModels(
            [t.model for t in tumours],
            tumours[0].train.context_slices,
            self._flips("tumour"),
            margin_mm=tumours[0].train.roi_margin_mm,
            gain=tumours[0].gain,
            clip=tumours[0].train.relative_clip,
        )
        return liver, tumour

    def predict_stages(self, path: Path) -> StagePrediction:
        """Stage 1 alone and the cascade, as post-processed native labels."""
        first = self.cascades[0].liver
        scan = prepare_scan(path, first.preprocess, first.zscore)
        liver_models, tumour_models = self.stages()
        probs = liver_stage(scan.image, liver_models, self.device)
        result = tumour_stage(probs, scan.image, scan.grid.spacing, tumour_models, self.device)
        return StagePrediction(
            scan,
            self.native(result.liver, scan, cascade=False),
            self.native(result.final, scan),
            [*scan.warnings, *(f"{path}: {w}" for w in result.warnings)],
        )

    def predict(self, path: Path) -> tuple[np.ndarray, PreparedScan]:
        """The cascade's post-processed uint8 labels in the file's (i, j, k) order, and the
        prepared scan."""
        out = self.predict_stages(path)
        return out.cascade, replace(out.scan, warnings=tuple(out.warnings))

    def labels(self, path: Path) -> tuple[np.ndarray, NiftiInfo]:
        """Post-processed uint8 labels in the file's (i, j, k) order, and its header."""
        labels, scan = self.predict(path)
        return labels, scan.info

    @property
    def tumour_threshold(self) -> float | None:
        """The cascade's tumour threshold: ``post.tumour_threshold``, or when that is None
        the tumour stages' val-tuned thresholds averaged (None: argmax, as without a
        tumour stage)."""
        found = [c.tumour.tumour_threshold for c in self.cascades if c.tumour is not None]
        if found and self.post.tumour_threshold is not None:
            return self.post.tumour_threshold
        values = [t for t in found if t is not None]
        return float(np.mean(values)) if values and len(values) == len(found) else None

    def native(self, probs: np.ndarray, scan: PreparedScan, cascade: bool = True) -> np.ndarray:
        """Model-grid softmax -> post-processed uint8 labels in the file's (i, j, k) order,
        resampled back as the store resampled labels in; ``cascade``: with the tumour
        threshold and seed (stage 1 alone: argmax)."""
        post = self.post
        labels = decide(probs, self.tumour_threshold if cascade else None, post.tumour_seed)
        return native_labels(
            labels,
            scan,
            post.largest_liver,
            post.tumour_in_liver,
            post.min_lesion_mm3,
            self.cascades[0].liver.preprocess.label_interpolation,
        )


def _check_ensemble(runs: Sequence[Run], stage: str) -> None:
    first = runs[0]
    for run in runs[1:]:
        if run.store_config_hash != first.store_config_hash:
            raise LiverpipeError(
                run.run_dir,
                f"its store preprocessing ({run.store_config_hash}) differs from "
                f"{first.run_dir} ({first.store_config_hash}), so they cannot be ensembled",
                "ensemble only runs trained on the same store",
            )
        keys = (
            "context_slices",
            "downsample",
            "roi_margin_mm",
            "relative_window_hu",
            "relative_clip",
        )
        differ = [k for k in keys if getattr(run.train, k) != getattr(first.train, k)]
        if differ:
            raise LiverpipeError(
                run.run_dir,
                f"its {stage} stage reads the image differently from {first.run_dir} "
                f"({', '.join(differ)})",
                f"ensemble runs trained with the same [{'train' if stage == 'liver' else 'tumour'}] "
                "reading settings",
            )


def write_labels(labels: np.ndarray, info: NiftiInfo, out: Path) -> None:
    """Write uint8 labels with the input's header: shape, affine, qform/sform and codes."""
    header = info.header.copy()
    header.set_data_dtype(np.uint8)
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    header["cal_min"], header["cal_max"] = 0, 2
    data = labels.reshape(info.image.shape)  # keeps a trailing singleton 4th axis
    image = type(info.image)(data, None, header)  # None: keep the header's own q/sform
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{''.join(out.suffixes)}")
    nib.save(image, tmp)
    tmp.replace(out)


def _json_path(mask: Path) -> Path:
    name = mask.name.removesuffix(".gz").removesuffix(".nii")
    return mask.with_name(f"{name}.json")


def predict_file(
    predictor: Predictor, scan: Path, out: Path, source: str | None = None
) -> dict[str, Any]:
    """Predict one scan into ``out`` (NIfTI) and ``out``'s ``.json`` measurements;
    ``source`` names the input in the JSON when ``scan`` stands in for it (a DICOM
    series converted to NIfTI)."""
    labels, prepared = predictor.predict(scan)
    write_labels(labels, prepared.info, out)
    record = {
        "scan": source or str(scan),
        "mask": str(out),
        "model_version": predictor.version,
        "models": [str(r.checkpoint) for r in predictor.runs],
        "tta": predictor.tta,
        "tta_flips": [list(f) for f in predictor.tta_flips if f],
        "tumour_threshold": predictor.tumour_threshold,  # None: argmax (no tumour stage)
        "tumour_seed": predictor.post.tumour_seed,
        "affine_source": prepared.info.affine_source,
        "fov": prepared.fov.to_json(),
        "warnings": list(prepared.warnings),
        **measure(labels, prepared.info.affine),
    }
    _json_path(out).write_text(json.dumps(record, indent=2))
    return record


def check_output(source: Path, output: Path) -> None:
    """Refuse an output that cannot be written (a file where the output folder, or one of
    its parents, would go), before any model loads."""
    single = source.is_file() and not output.is_dir() and is_nifti(output)
    folder = output.parent if single else output
    existing = file_in_the_way(folder)
    if existing is not None:
        raise LiverpipeError(
            existing,
            f"this is a file, so the masks cannot go into {folder}",
            "pass a folder for the masks (it is created), or a .nii.gz path for one scan",
        )


def predict_path(
    predictor: Predictor,
    source: Path,
    output: Path,
    on_done: Callable[[Path, dict[str, Any] | Exception], None] | None = None,
    seg: bool = False,
) -> dict[Path, dict[str, Any] | Exception]:
    """Predict a file into a file, or every NIfTI in a folder into a folder.

    In folder mode a scan that fails is reported and the others go on; the mask of
    ``name.nii.gz`` is ``OUTPUT/name.nii.gz``, its measurements ``OUTPUT/name.json``.
    """
    check_output(source, output)
    if source.is_file():
        if output.is_dir() or not is_nifti(output):
            output = output / f"{case_id_of(source)}.nii.gz"
        outcome: dict[Path, dict[str, Any] | Exception] = {
            source: predict_file(predictor, source, output)
        }
        if on_done:
            on_done(source, outcome[source])
        return outcome
    if not source.is_dir():
        raise LiverpipeError(
            source, "no such file or folder", "pass a .nii/.nii.gz scan or a folder of them"
        )
    scans = sorted(p for p in source.iterdir() if is_nifti(p))
    if not scans and holds_dicom(source):
        return predict_dicom(predictor, source, output, on_done, seg)
    if not scans:
        raise LiverpipeError(
            source,
            "the folder holds no .nii or .nii.gz files and no DICOM series",
            "point INPUT at the scans",
        )
    results: dict[Path, dict[str, Any] | Exception] = {}
    for scan in scans:
        try:
            results[scan] = predict_file(predictor, scan, output / f"{case_id_of(scan)}.nii.gz")
        except LiverpipeError as err:
            results[scan] = err
        except Exception as err:  # a bug must not stop the scans after this one
            results[scan] = LiverpipeError(
                scan,
                f"prediction failed unexpectedly ({type(err).__name__}: {err})",
                "report it with the scan's header (`nib-ls -H FILE`); the other scans go on",
            )
        if on_done:
            on_done(scan, results[scan])
    return results


def predict_dicom(
    predictor: Predictor,
    folder: Path,
    output: Path,
    on_done: Callable[[Path, dict[str, Any] | Exception], None] | None = None,
    seg: bool = False,
    source: str | None = None,
) -> dict[Path, dict[str, Any] | Exception]:
    """Predict every DICOM series under ``folder`` into ``OUTPUT/<series>.nii.gz`` (and
    its JSON), on the grid the series defines. Each series is read, checked and written
    as a temporary NIfTI, which then takes the forward path of any scan; a series that
    fails is reported and the others go on. ``seg`` also writes ``<series>.seg.dcm``, a
    DICOM-SEG that references the source slices; a series that cannot have one
    (anonymised UIDs) keeps its NIfTI mask, and its JSON says why (``seg_error``).
    ``source`` names the input in the JSON when ``folder`` is a temporary copy (a PACS)."""
    results: dict[Path, dict[str, Any] | Exception] = {}
    for series in find_series(folder):
        try:
            with tempfile.TemporaryDirectory(prefix="liverpipe-dicom-") as tmp:
                scan = write_nifti(series, Path(tmp) / f"{series.name}.nii.gz")
                mask = output / f"{series.name}.nii.gz"
                record = predict_file(predictor, scan, mask, source or str(series.folder))
            if seg:
                record = _with_seg(record, series, mask)
            results[series.folder] = record
        except LiverpipeError as err:
            results[series.folder] = err
        if on_done:
            on_done(series.folder, results[series.folder])
    return results


def _with_seg(record: dict[str, Any], series: DicomSeries, mask: Path) -> dict[str, Any]:
    labels = np.asarray(nib.Nifti1Image.from_filename(mask).dataobj)
    try:
        path = write_seg(labels, series, mask.with_name(f"{series.name}.seg.dcm"))
        record = {**record, "seg": str(path)}
    except LiverpipeError as err:
        record = {**record, "seg": None, "seg_error": str(err)}
        record["warnings"] = [*record.get("warnings", []), str(err)]
    _json_path(mask).write_text(json.dumps(record, indent=2))
    return record
