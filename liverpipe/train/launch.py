"""Train both stages of the three architectures: side by side in child processes, or here.

:func:`start_run` makes a new versioned run ``RUNS/<run_id>`` (``run.json`` records the
store, its config hash and the exact cases; nothing is overwritten). In it each
architecture gets ``<model>/liver`` (stage 1) and ``<model>/tumour`` (stage 2); the
stages train independently (stage 2 reads the ground-truth liver's ROI), so the six jobs
can run in any order and at the same time.

Where the jobs run (:func:`job_slots`):

- several GPUs: one ``python -m liverpipe.train`` process per job, pinned to one device
  (``CUDA_VISIBLE_DEVICES``), at most one job per GPU at a time;
- no GPU: the same child processes, ``cpu_jobs`` at a time (default one per core, at
  most the number of jobs), each with its share of the cores as torch threads. Small
  2D networks use many threads poorly: on the 2-core development machine a training
  step on one thread each runs 1.2-1.35x the images per second of one job on both
  cores, though whole jobs gain less (docs/benchmarks.md);
- one GPU, or ``cpu_jobs=1``: one job after another in this process.

Jobs start longest first (steps x batch x input pixels), so the last to finish is a short
one. With ``[train_all] minutes`` each job, when it starts, gets its share of the time
left as its ``max_minutes`` (:func:`liverpipe.train.budget.share_of`: the time the slots
hold, less what the running jobs still plan to use, in the part its cost is of the
jobs not yet started), and caps its steps to fit. The resolved settings travel to a
child as JSON, so it trains with exactly the parent's config. A job that fails does not
stop the others; its error (and log file) is reported.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from liverpipe._files import file_in_the_way
from liverpipe._system import available_cpus
from liverpipe.errors import LiverpipeError
from liverpipe.models import MODELS
from liverpipe.rundir import RUN_RECORD, RunRecord, RunResult, StageDir, latest_run, new_run_id
from liverpipe.settings import Settings, Stage
from liverpipe.train.budget import share_of
from liverpipe.train.loop import TrainResult, require_train_cases, train
from storage import SliceStore

__all__ = [
    "STAGES",
    "JobSlot",
    "ModelOutcome",
    "job_cost",
    "job_slots",
    "parse_gpus",
    "read_result",
    "start_run",
    "train_all",
    "visible_gpus",
]

#: The stages train-all trains for each model, in order.
STAGES: tuple[Stage, ...] = ("liver", "tumour")


@dataclass(frozen=True)
class ModelOutcome:
    """One model's result, or why it failed."""

    model: str
    run_dir: Path
    result: TrainResult | None
    error: str | None = None
    device: str = "this process"
    stage: Stage = "liver"

    @property
    def job(self) -> str:
        return f"{self.model} {self.stage}"


@dataclass(frozen=True)
class JobSlot:
    """Where a child training process runs: its name and the environment that pins it."""

    name: str
    env: dict[str, str]


def job_slots(gpus: Sequence[str], cpu_jobs: int | None, jobs: int) -> list[JobSlot]:
    """The slots training jobs run in side by side; empty: one after another here.

    Two or more ``gpus``: one slot per GPU. No GPU: ``cpu_jobs`` slots (default one per
    available core, at most ``jobs``), each with ``cores // slots`` torch threads; one
    slot (or one GPU) trains here instead.
    """
    if len(gpus) > 1:
        return [JobSlot(f"GPU {g}", {"CUDA_VISIBLE_DEVICES": g}) for g in gpus]
    if gpus:
        return []
    cores = available_cpus()
    count = min(jobs, cores) if cpu_jobs is None else min(jobs, cpu_jobs)
    if count <= 1:
        return []
    threads = max(1, cores // count)
    env = {"CUDA_VISIBLE_DEVICES": ""} | {
        var: str(threads) for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    }
    unit = "thread" if threads == 1 else "threads"
    return [JobSlot(f"CPU slot {i} ({threads} {unit})", env) for i in range(count)]


def visible_gpus() -> list[str]:
    """CUDA device indices this process may use (empty on a CPU machine)."""
    return [str(i) for i in range(torch.cuda.device_count())]


def parse_gpus(text: str) -> list[str] | None:
    """``auto`` -> None (every visible GPU); ``0,1`` -> ["0", "1"]; ``none`` -> []."""
    if text == "auto":
        return None
    return [g.strip() for g in text.split(",") if g.strip() not in {"", "none"}]


def read_result(run_dir: Path) -> TrainResult:
    """The ``result.json`` a finished training run leaves in its folder."""
    result = RunResult.read(StageDir(run_dir))
    return TrainResult(
        run_dir, result.steps, result.best_score, result.last_loss, result.planned_steps
    )


def start_run(
    runs_root: Path,
    store_path: Path,
    settings: Settings,
    models: Sequence[str] = tuple(MODELS),
    resume: bool = False,
) -> Path:
    """A new run folder ``RUNS/<run_id>`` with its ``run.json``; with ``resume``, the
    newest run under ``runs_root`` (a new one when there is none)."""
    runs_root = Path(runs_root)
    blocker = file_in_the_way(runs_root)
    if blocker is not None:
        raise LiverpipeError(
            blocker,
            f"this is a file, so {runs_root} cannot be the runs folder",
            "pass a folder path for the runs (it is created when missing)",
        )
    if resume:
        latest = latest_run(runs_root)
        if latest is not None:
            return latest
    store = SliceStore.open(store_path)
    cases = {split: store.cases(split) for split in ("train", "val", "test")}
    require_train_cases(store_path, cases["train"])  # once, before six jobs fail alike
    recorded = settings.model_dump(mode="json")
    run_id = new_run_id(recorded, cases)
    folder = runs_root / run_id
    folder.mkdir(parents=True)  # a run id is never reused
    RunRecord(
        run_id=run_id,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        store=str(Path(store_path).resolve()),
        store_config_hash=store.meta.config_hash,
        cases=cases,
        models=list(models),
        settings=recorded,
    ).write(folder)
    return folder


def train_all(
    store_path: Path,
    runs_dir: Path,
    settings: Settings,
    *,
    resume: bool = False,
    gpus: Sequence[str] | None = None,
    cpu_jobs: int | None = None,
    models: Sequence[str] = tuple(MODELS),
    on_done: Callable[[ModelOutcome], None] | None = None,
    on_start: Callable[[str], Callable[[int, float], None]] | None = None,
) -> list[ModelOutcome]:
    """Train each model's stages into ``runs_dir/<model>/<stage>/``, side by side in the
    slots of :func:`job_slots` (several GPUs; on a machine without one, ``cpu_jobs``
    processes), else one after another here.

    ``gpus`` defaults to every visible CUDA device. Outcomes come back in (model, stage)
    order. ``on_start("<model> <stage>")`` may return a per-step callback (``on_step``)
    for jobs trained in this process; jobs in their own processes report through
    ``train.log``. With ``[train_all] minutes`` each job's share of the time left
    becomes its ``max_minutes`` when it starts.
    """
    gpus = visible_gpus() if gpus is None else list(gpus)
    record = runs_dir / RUN_RECORD
    cases = RunRecord.read(runs_dir).cases if record.is_file() else None
    per_model = {m: _for_model(settings, m) for m in models}
    jobs = [(m, stage) for m in models for stage in STAGES]
    slots = job_slots(gpus, cpu_jobs, len(jobs))
    if slots and not gpus:  # CPU jobs side by side share the machine's memory too
        per_model = {m: _share_memory(s, len(slots)) for m, s in per_model.items()}
    budget = _TimeShares(settings.train_all.minutes, per_model, max(1, len(slots)), _clock)
    if not slots:
        outcomes = []
        for name, stage in jobs:
            on_step = on_start(f"{name} {stage}") if on_start else None
            outcome = _train_here(
                store_path,
                runs_dir / name / stage,
                budget.settings(name, stage),
                resume,
                on_step,
                stage,
                cases=cases,
            )
            budget.finish(name, stage)
            if on_done:
                on_done(outcome)
            outcomes.append(outcome)
        return outcomes
    free: queue.Queue[JobSlot] = queue.Queue()
    for slot in slots:
        free.put(slot)

    def one(job: tuple[str, Stage]) -> ModelOutcome:
        name, stage = job
        slot = free.get()
        try:
            outcome = _train_child(
                store_path,
                runs_dir / name / stage,
                budget.settings(name, stage),
                resume,
                slot,
                stage,
                record=record,
            )
        finally:
            budget.finish(name, stage)
            free.put(slot)
        if on_done:
            on_done(outcome)
        return outcome

    longest_first = sorted(jobs, key=lambda j: -job_cost(per_model[j[0]], j[1]))
    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        done = dict(zip(longest_first, pool.map(one, longest_first), strict=True))
    return [done[job] for job in jobs]


#: The clock that ``[train_all] minutes`` reads (a test replaces it).
_clock = time.monotonic


class _TimeShares:
    """``[train_all] minutes`` shared out: each job takes its share of the time left
    when it starts (none without a budget)."""

    def __init__(
        self,
        minutes: float | None,
        per_model: dict[str, Settings],
        lanes: int,
        clock: Callable[[], float],
    ) -> None:
        self.per_model, self.lanes, self.clock = per_model, lanes, clock
        self.deadline = None if minutes is None else clock() + 60.0 * minutes
        self.queued = {(m, st): job_cost(s, st) for m, s in per_model.items() for st in STAGES}
        self.running: dict[tuple[str, Stage], float] = {}  # the planned ends of their shares
        self.lock = threading.Lock()

    def settings(self, model: str, stage: Stage) -> Settings:
        """The job's settings, with its share of the time left as its ``max_minutes``
        (at least a second; the stage's own ``max_minutes`` where smaller)."""
        base = self.per_model[model]
        with self.lock:
            cost = self.queued.pop((model, stage))
            if self.deadline is None:
                return base
            now = self.clock()
            busy = [end - now for end in self.running.values()]
            share = share_of(self.deadline - now, cost, sum(self.queued.values()), self.lanes, busy)
            self.running[model, stage] = now + share
        cfg = base.stage(stage)
        minutes = max(share, 1.0) / 60.0
        if cfg.max_minutes is not None:
            minutes = min(minutes, cfg.max_minutes)
        section = "train" if stage == "liver" else "tumour"
        return base.model_copy(update={section: cfg.model_copy(update={"max_minutes": minutes})})

    def finish(self, model: str, stage: Stage) -> None:
        """The job ended: its lane is free for the jobs after it."""
        with self.lock:
            self.running.pop((model, stage), None)


#: Time of a training step relative to DeepLabV3Plus at the same input. Measured on the
#: CPU demo's jobs (RegNetX-400MF, depth 4, width 64, 64² inputs, batch 16, one thread
#: each, two side by side): 0.186 / 0.152 / 0.100 s a step on 2026-12-04 (Intel Xeon,
#: AVX-512), and wall times of 10:24 / 7:20 / 4:41 for 1500 steps on 2026-12-03 (AMD
#: EPYC, AVX2). Only the order of the jobs and the shares of a time budget read it.
STEP_COST: dict[str, float] = {"unetplusplus": 2.0, "manet": 1.55, "deeplabv3plus": 1.0}


def job_cost(settings: Settings, stage: Stage) -> float:
    """A job's rough size for ordering and for shares of a time budget: steps x batch x
    input pixels of a sample (the liver stage's slices after ``downsample``, the tumour
    stage's crops) x the architecture's :data:`STEP_COST`."""
    cfg = settings.stage(stage)
    height, width = cfg.crop_size if stage == "tumour" else settings.preprocess.slice_size
    scale = 1 if stage == "tumour" else cfg.downsample**2
    pixels = cfg.steps * cfg.batch_size * height * width / scale
    return pixels * STEP_COST.get(cfg.model, 1.0)


def _share_memory(settings: Settings, jobs: int) -> Settings:
    """The settings with the resident budget of each stage split between ``jobs``."""
    return settings.model_copy(
        update={
            stage: cfg.model_copy(update={"resident_budget_gb": cfg.resident_budget_gb / jobs})
            for stage, cfg in (("train", settings.train), ("tumour", settings.tumour))
        }
    )


def _for_model(settings: Settings, model: str) -> Settings:
    """The settings with both stages set to ``model``."""
    return settings.model_copy(
        update={
            "train": settings.train.model_copy(update={"model": model}),
            "tumour": settings.tumour.model_copy(update={"model": model}),
        }
    )


def _train_here(
    store_path: Path,
    run_dir: Path,
    settings: Settings,
    resume: bool,
    on_step: Callable[[int, float], None] | None,
    stage: Stage,
    *,
    cases: dict[str, list[str]] | None,
) -> ModelOutcome:
    name = settings.stage(stage).model
    try:
        result = train(
            store_path, run_dir, settings, resume=resume, on_step=on_step, stage=stage, cases=cases
        )
        return ModelOutcome(name, run_dir, result, stage=stage)
    except Exception as err:  # one model's failure must not stop the others
        return ModelOutcome(name, run_dir, None, f"{type(err).__name__}: {err}", stage=stage)


def _train_child(
    store_path: Path,
    run_dir: Path,
    settings: Settings,
    resume: bool,
    slot: JobSlot,
    stage: Stage,
    *,
    record: Path,
) -> ModelOutcome:
    name = settings.stage(stage).model
    folder = StageDir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    settings_file = folder.settings
    settings_file.write_text(settings.model_dump_json(indent=2))
    folder.result.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "liverpipe.train",
        "--store",
        str(store_path),
        "--out",
        str(run_dir),
        "--settings",
        str(settings_file),
        "--stage",
        stage,
    ]
    if resume:
        cmd.append("--resume")
    if record.is_file():
        cmd += ["--run-record", str(record)]
    env = {**os.environ, **slot.env}
    log = folder.log
    with log.open("a") as fh:
        code = subprocess.run(
            cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False
        ).returncode
    device = slot.name
    if code != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(empty log)"]
        return ModelOutcome(
            name, run_dir, None, f"exit code {code}: {tail[0]} (full log: {log})", device, stage
        )
    return ModelOutcome(name, run_dir, read_result(run_dir), None, device, stage)
