"""Predict liver and tumour masks for new scans with one trained run or an ensemble.

Each run folder holds ``config.json`` (train settings and the preprocessing of the store
it trained on) and ``best.pt``/``last.pt``. The mask is written on the input's grid with
its exact header (shape, affine, qform/sform codes), as uint8, with a measurements JSON
beside it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from liverpipe.errors import LiverpipeError
from liverpipe.inference import (
    PreparedScan,
    native_labels,
    predict_probabilities,
    prepare_scan,
    tta_flips,
)
from liverpipe.measure import measure
from liverpipe.models import build_model
from liverpipe.nifti import NiftiInfo, case_id_of, is_nifti
from liverpipe.preprocess import ZScoreStats
from liverpipe.settings import PreprocessConfig, TrainConfig
from liverpipe.train import load_checkpoint

__all__ = ["PostProcess", "Predictor", "Run", "load_run", "predict_path", "write_labels"]


@dataclass(frozen=True, eq=False)
class Run:
    """A trained model and the preprocessing it expects."""

    run_dir: Path
    checkpoint: Path
    train: TrainConfig
    preprocess: PreprocessConfig
    zscore: ZScoreStats | None
    store_config_hash: str
    model: torch.nn.Module

    @property
    def name(self) -> str:
        return self.run_dir.name


def load_run(run_dir: Path, device: torch.device | None = None) -> Run:
    """Load ``best.pt`` (else ``last.pt``) of a run folder with ``weights_only=True``."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise LiverpipeError(
            run_dir,
            "not a training run folder (no config.json)",
            "pass a folder made by `liverpipe train` or `liverpipe train-all` (RUNS/<model>)",
        )
    record = json.loads(config_path.read_text())
    checkpoint = next(
        (run_dir / n for n in ("best.pt", "last.pt") if (run_dir / n).is_file()), None
    )
    if checkpoint is None:
        raise LiverpipeError(
            run_dir,
            "no checkpoint (best.pt or last.pt) in this run folder",
            "let the training finish, or resume it with `liverpipe train --resume`",
        )
    train_cfg = TrainConfig.model_validate(record["train"])
    store_config = record.get("store_config") or {}
    if "preprocess" not in store_config:
        raise LiverpipeError(
            config_path,
            "the run does not record the preprocessing of its store",
            "retrain with this version of liverpipe, which writes store_config into config.json",
        )
    state = load_checkpoint(checkpoint)
    if state.get("identity", {}).get("store_config_hash") != record.get("store_config_hash"):
        raise LiverpipeError(
            checkpoint,
            "the checkpoint was made for another store than config.json describes",
            "do not mix files between run folders; retrain into a fresh folder",
        )
    model = build_model(train_cfg.model, train_cfg.encoder, train_cfg.context_slices, 3)
    model.load_state_dict(state["model"])
    model.to(device or torch.device("cpu")).eval()
    zscore = store_config.get("zscore")
    return Run(
        run_dir,
        checkpoint,
        train_cfg,
        PreprocessConfig.model_validate(store_config["preprocess"]),
        ZScoreStats(**zscore) if zscore else None,
        str(record["store_config_hash"]),
        model,
    )


@dataclass(frozen=True)
class PostProcess:
    """Post-processing steps on the native grid; each can be switched off."""

    largest_liver: bool = True
    tumour_in_liver: bool = True


@dataclass
class Predictor:
    """One run or an ensemble (mean of softmax), with optional flip TTA."""

    runs: Sequence[Run]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tta: bool = False
    post: PostProcess = field(default_factory=PostProcess)

    def __post_init__(self) -> None:
        if not self.runs:
            raise ValueError("at least one run is needed")
        first = self.runs[0]
        for run in self.runs[1:]:
            if run.store_config_hash != first.store_config_hash:
                raise LiverpipeError(
                    run.run_dir,
                    f"its store preprocessing ({run.store_config_hash}) differs from "
                    f"{first.run_dir} ({first.store_config_hash}), so they cannot be ensembled",
                    "ensemble only runs trained on the same store",
                )
            if run.train.context_slices != first.train.context_slices:
                raise LiverpipeError(
                    run.run_dir,
                    "its context_slices differs from the other runs'",
                    "ensemble runs with the same context_slices",
                )
        if self.tta and self.tta_flips == [()]:
            raise LiverpipeError(
                first.run_dir,
                "test-time augmentation averages the flips the model trained with, and "
                "these runs share none ([train.augment] flip_axes)",
                "predict without --tta, or retrain with flip_axes = ['lr', 'ap']",
            )

    @property
    def tta_flips(self) -> list[tuple[int, ...]]:
        """The flips TTA averages: every combination of the axes all runs trained with."""
        if not self.tta:
            return [()]
        axes = set.intersection(*(set(r.train.augment.flip_axes) for r in self.runs))
        return tta_flips(tuple(sorted(axes)))

    def predict(self, path: Path) -> tuple[np.ndarray, PreparedScan]:
        """Post-processed uint8 labels in the file's (i, j, k) order, and the prepared scan."""
        first = self.runs[0]
        scan = prepare_scan(path, first.preprocess, first.zscore)
        probs = predict_probabilities(
            [r.model for r in self.runs],
            scan.image,
            first.train.context_slices,
            self.device,
            flips=self.tta_flips,
        )
        stored = probs.argmax(0).astype(np.uint8)
        labels = native_labels(stored, scan, self.post.largest_liver, self.post.tumour_in_liver)
        return labels, scan

    def labels(self, path: Path) -> tuple[np.ndarray, NiftiInfo]:
        """Post-processed uint8 labels in the file's (i, j, k) order, and its header."""
        labels, scan = self.predict(path)
        return labels, scan.info


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


def predict_file(predictor: Predictor, scan: Path, out: Path) -> dict[str, Any]:
    """Predict one scan into ``out`` (NIfTI) and ``out``'s ``.json`` measurements."""
    labels, prepared = predictor.predict(scan)
    write_labels(labels, prepared.info, out)
    record = {
        "scan": str(scan),
        "mask": str(out),
        "models": [str(r.checkpoint) for r in predictor.runs],
        "tta": predictor.tta,
        "tta_flips": [list(f) for f in predictor.tta_flips if f],
        "affine_source": prepared.info.affine_source,
        "fov": prepared.fov.to_json(),
        "warnings": list(prepared.warnings),
        **measure(labels, prepared.info.affine),
    }
    _json_path(out).write_text(json.dumps(record, indent=2))
    return record


def predict_path(
    predictor: Predictor,
    source: Path,
    output: Path,
    on_done: Callable[[Path, dict[str, Any] | Exception], None] | None = None,
) -> dict[Path, dict[str, Any] | Exception]:
    """Predict a file into a file, or every NIfTI in a folder into a folder.

    In folder mode a scan that fails is reported and the others go on; the mask of
    ``name.nii.gz`` is ``OUTPUT/name.nii.gz``, its measurements ``OUTPUT/name.json``.
    """
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
    if not scans:
        raise LiverpipeError(
            source, "the folder holds no .nii or .nii.gz files", "point INPUT at the scans"
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
