"""The runs folder: the one owner of its layout, its file names and its records.

::

    RUNS/
      registry.json              champions and their history (liverpipe.ops.registry)
      ingest_state.json          the scheduled ingest's state (liverpipe.ops.inbox)
      <run_id>/                  one train-all; never overwritten
        run.json                 RunRecord: config, store, the exact cases it used
        <model>/liver/           a StageDir (stage 1)
        <model>/tumour/          a StageDir (stage 2)

A ``run_id`` such as ``20261128T081500Z-3f9c2a1b`` sorts by time and ends in a short
hash of the settings and the case lists. Records are frozen, validate in ``from_dict``,
and are written atomically.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from liverpipe._files import nan_if_null, read_json, strict_json, write_json_atomic
from liverpipe.errors import LiverpipeError

__all__ = [
    "RUN_RECORD",
    "RunRecord",
    "RunResult",
    "StageDir",
    "latest_run",
    "new_run_id",
    "resolve_run",
    "run_folders",
]

RUN_RECORD = "run.json"


@dataclass(frozen=True)
class StageDir:
    """One stage's run folder and the files in it."""

    path: Path

    @property
    def config(self) -> Path:
        """Settings, stage and the store's preprocessing, written when training starts."""
        return self.path / "config.json"

    @property
    def best(self) -> Path:
        return self.path / "best.pt"

    @property
    def last(self) -> Path:
        return self.path / "last.pt"

    @property
    def result(self) -> Path:
        """:class:`RunResult`, written when training ends."""
        return self.path / "result.json"

    @property
    def history(self) -> Path:
        """One JSON line per logged step and per validation."""
        return self.path / "history.jsonl"

    @property
    def log(self) -> Path:
        """stdout and stderr of a job trained in its own process."""
        return self.path / "train.log"

    @property
    def settings(self) -> Path:
        """The resolved settings handed to a job trained in its own process."""
        return self.path / "settings.json"

    def checkpoint(self) -> Path | None:
        """``best.pt``, else ``last.pt``, else None."""
        return next((p for p in (self.best, self.last) if p.is_file()), None)


@dataclass(frozen=True)
class RunResult:
    """``result.json``: how a stage's training ended and which checkpoint is the model."""

    steps: int
    best_score: float
    last_loss: float
    stage: str
    checkpoint: str
    selection: str
    tumour_threshold: float | None = None
    thresholds_tried: Mapping[str, float | None] = field(default_factory=dict)
    #: The lesion seed the candidates were decided with (None: none, runs before it).
    threshold_seed: float | None = None
    #: The steps planned, where a time budget (``max_minutes``) trained fewer.
    planned_steps: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = strict_json(asdict(self))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: Path | None = None) -> RunResult:
        try:
            return cls(
                steps=int(data["steps"]),
                best_score=nan_if_null(data["best_score"]),
                last_loss=nan_if_null(data["last_loss"]),
                stage=str(data.get("stage", "liver")),
                checkpoint=str(data.get("checkpoint", "best.pt")),
                selection=str(data.get("selection", "")),
                tumour_threshold=(
                    None
                    if data.get("tumour_threshold") is None
                    else float(data["tumour_threshold"])
                ),
                thresholds_tried=dict(data.get("thresholds_tried", {})),
                threshold_seed=(
                    None if data.get("threshold_seed") is None else float(data["threshold_seed"])
                ),
                planned_steps=(
                    None if data.get("planned_steps") is None else int(data["planned_steps"])
                ),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise LiverpipeError(
                where, f"result.json is incomplete or invalid ({err!r})", "retrain this stage"
            ) from err

    @classmethod
    def read(cls, folder: StageDir) -> RunResult:
        if not folder.result.is_file():
            raise LiverpipeError(
                folder.path,
                "the run has no result.json, so it did not finish",
                f"read {folder.log} for the cause, then rerun with --resume",
            )
        return cls.from_dict(json.loads(folder.result.read_text()), folder.result)

    def write(self, folder: StageDir) -> None:
        write_json_atomic(folder.result, self.to_dict())


@dataclass(frozen=True)
class RunRecord:
    """``run.json``: one train-all run, enough to reproduce and to compare it."""

    run_id: str
    created: str
    store: str
    store_config_hash: str
    cases: dict[str, list[str]]  # split -> the case ids it saw (train, val) or held out (test)
    models: list[str]
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: Path | None = None) -> RunRecord:
        try:
            record = cls(
                run_id=str(data["run_id"]),
                created=str(data["created"]),
                store=str(data["store"]),
                store_config_hash=str(data["store_config_hash"]),
                cases={str(k): [str(c) for c in v] for k, v in data["cases"].items()},
                models=[str(m) for m in data["models"]],
                settings=dict(data["settings"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise LiverpipeError(
                where, f"run.json is incomplete or invalid ({err!r})", "do not edit run.json"
            ) from err
        if not set(record.cases) <= {"train", "val", "test"}:
            raise LiverpipeError(where, "run.json names an unknown split", "do not edit run.json")
        return record

    @property
    def seen(self) -> set[str]:
        """Cases it trained or validated on."""
        return set(self.cases.get("train", [])) | set(self.cases.get("val", []))

    @classmethod
    def read(cls, run: Path) -> RunRecord:
        path = run / RUN_RECORD
        if not path.is_file():
            raise LiverpipeError(
                run,
                "not a versioned training run (no run.json)",
                "pass RUNS/<run_id> made by `liverpipe train-all` (`liverpipe models list`)",
            )
        return cls.from_dict(read_json(path, {}), path)

    def write(self, run: Path) -> None:
        write_json_atomic(run / RUN_RECORD, self.to_dict())


def new_run_id(
    settings: Mapping[str, Any], cases: Mapping[str, list[str]], now: datetime | None = None
) -> str:
    """``<UTC time>-<8 hex>``: sorts by time; the hash covers the settings and the cases."""
    moment = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    payload = json.dumps({"settings": settings, "cases": cases}, sort_keys=True, default=str)
    return f"{moment}-{hashlib.sha256(payload.encode()).hexdigest()[:8]}"


def run_folders(root: Path) -> list[Path]:
    """Versioned runs under ``root`` (folders with run.json), oldest first."""
    if not Path(root).is_dir():
        return []
    return sorted(p for p in Path(root).iterdir() if (p / RUN_RECORD).is_file())


def latest_run(root: Path) -> Path | None:
    """The newest versioned run under ``root``."""
    found = run_folders(root)
    return found[-1] if found else None


def resolve_run(path: Path) -> Path:
    """A folder of model folders: ``path`` itself (a run, or an unversioned layout with
    ``<model>/liver``), or, for a runs root, its newest run."""
    path = Path(path)
    if (path / RUN_RECORD).is_file() or any(path.glob("*/liver/config.json")):
        return path
    if (path / "config.json").is_file() or (path / "liver" / "config.json").is_file():
        return path  # one model or one stage: the caller decides
    latest = latest_run(path)
    if latest is None:
        raise LiverpipeError(
            path,
            "no trained runs here (no <run_id>/run.json, no <model>/liver/config.json)",
            "pass the --out folder of `liverpipe train-all`",
        )
    return latest
