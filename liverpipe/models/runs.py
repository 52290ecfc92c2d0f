"""Trained runs on disk: one stage's run folder, and one architecture's cascade.

Layout (``liverpipe train-all``; :mod:`liverpipe.rundir` owns the file names)::

    RUNS/<run_id>/<model>/liver/    stage 1: config.json, best.pt / last.pt, result.json, ...
    RUNS/<run_id>/<model>/tumour/   stage 2: the same files

A stage folder's ``config.json`` records its stage, its settings and the preprocessing of
the store it trained on; checkpoints load with ``weights_only=True``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from liverpipe.errors import LiverpipeError
from liverpipe.models.architectures import model_for
from liverpipe.models.checkpoint import load_checkpoint
from liverpipe.preprocess import ZScoreStats
from liverpipe.roi import relative_gain
from liverpipe.rundir import RUN_RECORD, RunResult, StageDir, resolve_run
from liverpipe.settings import PreprocessConfig, TrainConfig, TumourConfig

__all__ = [
    "Cascade",
    "Run",
    "expand_models",
    "find_models",
    "hu_per_unit",
    "load_cascade",
    "load_run",
]


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
    #: Tumour stage: the tumour-probability threshold tuned on val (None: argmax).
    tumour_threshold: float | None = None
    #: How the checkpoint was chosen (``result.json``).
    selection: str = ""

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def stage(self) -> str:
        return self.train.stage

    @property
    def gain(self) -> float:
        """Stored units -> the tumour stage's liver-relative units."""
        return relative_gain(
            hu_per_unit(self.preprocess, self.zscore), self.train.relative_window_hu
        )


def load_run(run_dir: Path, device: torch.device | None = None) -> Run:
    """Load ``best.pt`` (else ``last.pt``) of a run folder with ``weights_only=True``."""
    run_dir = Path(run_dir)
    folder = StageDir(run_dir)
    config_path = folder.config
    if not config_path.is_file():
        raise LiverpipeError(
            run_dir,
            "not a training run folder (no config.json)",
            "pass a folder made by `liverpipe train` or `liverpipe train-all` (RUNS/<model>)",
        )
    record = json.loads(config_path.read_text())
    checkpoint = folder.checkpoint()
    if checkpoint is None:
        raise LiverpipeError(
            run_dir,
            "no checkpoint (best.pt or last.pt) in this run folder",
            "let the training finish, or resume it with `liverpipe train --resume`",
        )
    stage = record.get("stage", "liver")
    section = TrainConfig if stage == "liver" else TumourConfig
    saved = record["train" if stage == "liver" else "tumour"]
    # Runs from before relative_clip existed read the tumour stage's input unclipped.
    train_cfg = section.model_validate({"relative_clip": False, **saved})
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
    if state.get("identity", {}).get("train", {}).get("stage", "liver") != stage:
        raise LiverpipeError(
            checkpoint,
            f"the checkpoint was trained for another stage than config.json's {stage!r}",
            "do not mix files between run folders; retrain into a fresh folder",
        )
    model = model_for(train_cfg)
    model.load_state_dict(state["model"])
    # channels_last, as it trained (faster convolutions on the CPU and on CUDA)
    model.to(device or torch.device("cpu")).to(memory_format=torch.channels_last).eval()
    zscore = store_config.get("zscore")
    result = RunResult.read(folder) if folder.result.is_file() else None
    return Run(
        run_dir,
        checkpoint,
        train_cfg,
        PreprocessConfig.model_validate(store_config["preprocess"]),
        ZScoreStats(**zscore) if zscore else None,
        str(record["store_config_hash"]),
        model,
        result.tumour_threshold if result else None,
        result.selection if result else f"{checkpoint.name} (unfinished run)",
    )


def hu_per_unit(config: PreprocessConfig, zscore: ZScoreStats | None) -> float:
    """HU per normalised unit of a store's images (``Intensity.hu_scale``)."""
    if config.normalization == "window":
        return config.hu_window[1] - config.hu_window[0]
    if zscore is None:
        raise ValueError("a z-score store records its statistics")
    return zscore.std


@dataclass(frozen=True, eq=False)
class Cascade:
    """One architecture's two stages; ``tumour`` is None for a liver-only run."""

    liver: Run
    tumour: Run | None
    name: str
    #: The versioned run (``RUNS/<run_id>``) it belongs to; None outside one.
    run_id: str | None = None

    @property
    def version(self) -> str:
        """``<run_id>/<model>``, or the folder for a model outside a versioned run."""
        return f"{self.run_id}/{self.name}" if self.run_id else str(self.liver.run_dir.parent)


def load_cascade(path: Path, device: torch.device | None = None) -> Cascade:
    """The cascade in a model folder (``RUNS/<model>`` with ``liver/`` and ``tumour/``), or
    a liver-stage run folder alone (stage 1 only).

    Raises:
        LiverpipeError: not a run folder; a tumour stage without its liver stage; a
            pair whose stages are swapped or were trained on different stores.
    """
    path = Path(path)
    if StageDir(path).config.is_file():
        run = load_run(path, device)
        if run.stage == "tumour":
            raise LiverpipeError(
                path,
                "this is a tumour-stage run, which needs the liver stage to find its ROI",
                f"pass the model folder that holds liver/ and tumour/ ({path.parent})",
            )
        return Cascade(run, None, path.name, _run_id(path.parent))
    if not StageDir(path / "liver").config.is_file():
        raise LiverpipeError(
            path,
            "not a trained model folder (no liver/config.json, no config.json)",
            "pass RUNS/<model> made by `liverpipe train-all`, or a run folder of `liverpipe train`",
        )
    liver = load_run(path / "liver", device)
    tumour = (
        load_run(path / "tumour", device) if StageDir(path / "tumour").config.is_file() else None
    )
    _check_pair(path, liver, tumour)
    return Cascade(liver, tumour, path.name, _run_id(path.parent))


def _run_id(folder: Path) -> str | None:
    record = folder / RUN_RECORD
    return str(json.loads(record.read_text())["run_id"]) if record.is_file() else None


def _check_pair(path: Path, liver: Run, tumour: Run | None) -> None:
    if liver.stage != "liver":
        raise LiverpipeError(
            liver.run_dir,
            f"the liver/ folder holds a {liver.stage}-stage run",
            "retrain the liver stage into liver/ (`liverpipe train --stage liver`)",
        )
    if tumour is None:
        return
    if tumour.stage != "tumour":
        raise LiverpipeError(
            tumour.run_dir,
            f"the tumour/ folder holds a {tumour.stage}-stage run",
            "retrain the tumour stage into tumour/ (`liverpipe train --stage tumour`)",
        )
    if tumour.store_config_hash != liver.store_config_hash:
        raise LiverpipeError(
            path,
            f"its stages were trained on different stores (liver {liver.store_config_hash}, "
            f"tumour {tumour.store_config_hash}), so they are not a pair",
            "retrain both stages on one store (`liverpipe train-all`)",
        )


def expand_models(paths: list[Path]) -> list[Path]:
    """Model folders from ``--model`` values: a versioned run (``RUNS/<run_id>``) stands
    for all its models; a model or stage folder stands for itself."""
    return [m for p in paths for m in (find_models(p) if (p / RUN_RECORD).is_file() else [p])]


def find_models(runs_dir: Path) -> list[Path]:
    """Model folders (``<model>/liver/config.json``) or liver runs in a run folder; for a
    runs root, in its newest versioned run (:func:`liverpipe.rundir.resolve_run`)."""
    runs_dir = resolve_run(Path(runs_dir)) if Path(runs_dir).is_dir() else Path(runs_dir)
    found = sorted(
        p
        for p in (runs_dir.iterdir() if runs_dir.is_dir() else [])
        if StageDir(p / "liver").config.is_file() or StageDir(p).config.is_file()
    )
    if not found:
        raise LiverpipeError(
            runs_dir,
            "no trained models here (no RUNS/<model>/liver/config.json)",
            "pass the --out folder of `liverpipe train-all`",
        )
    return found
