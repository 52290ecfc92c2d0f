"""Training one segmentation model on the slice store: small functions, one config.

``train`` runs the loop: foreground-oversampled 2.5D batches (device-resident or
streamed), on-device augmentation, Dice + cross-entropy, AdamW with warmup then cosine
or poly decay, gradient clipping, validation on the val split every N steps (3D Dice
per case), ``last.pt`` / ``best.pt``, ``config.json`` and ``history.jsonl``. ``--resume``
restores model, optimiser, scheduler and every RNG, so the resumed history equals an
uninterrupted run. With ``max_minutes`` the job caps its steps once from its measured
speed (:mod:`liverpipe.train.budget`); the cap travels in ``last.pt``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch

from liverpipe._files import strict_json, write_json_atomic
from liverpipe.errors import ConfigError, LiverpipeError
from liverpipe.models import load_checkpoint, model_for, save_checkpoint
from liverpipe.rundir import RunRecord, RunResult, StageDir
from liverpipe.settings import STRIDE, TUMOUR_SEED, Settings, Stage, TrainConfig, load_settings
from liverpipe.train.augment import augment_batch
from liverpipe.train.budget import StepBudget, StepCap
from liverpipe.train.sampling import SliceSampler, SliceTable, StreamingSource
from liverpipe.train.stages import (
    Source,
    make_source,
    prepare_batch,
    resolve_steps,
    stage_table,
    tune_threshold,
    validate,
)
from storage import SliceStore

__all__ = ["TrainResult", "lr_factor", "train"]

_log = logging.getLogger(__name__)

#: Train settings that may differ between a run and its resume.
RUNTIME_FIELDS = frozenset(
    {
        "steps",
        "epochs",
        "max_minutes",
        "val_every",
        "log_every",
        "resident",
        "resident_budget_gb",
        "stream_threads",
        "stream_cache_gb",
        "prefetch",
        "compile",
    }
)


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    steps: int
    best_score: float
    last_loss: float
    #: The steps planned, where a time budget (``max_minutes``) trained fewer.
    planned_steps: int | None = None

    @property
    def steps_text(self) -> str:
        """``1500 steps``, or ``645 of 1500 steps (time budget)``."""
        if self.planned_steps is None:
            return f"{self.steps} steps"
        return f"{self.steps} of {self.planned_steps} steps (time budget)"


def lr_factor(step: int, cfg: TrainConfig, steps: int | None = None) -> float:
    """Learning-rate multiplier: linear warmup, then cosine or poly decay to 0 at ``steps``
    (default ``cfg.steps``; a time budget's cap)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    total = cfg.steps if steps is None else steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return (1.0 - progress) ** 0.9


def _identity(cfg: TrainConfig, store: SliceStore) -> dict[str, Any]:
    model_cfg = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RUNTIME_FIELDS}
    return {"train": model_cfg, "store_config_hash": store.meta.config_hash}


class _BatchStream:
    """Batches in sampler order; ``sampler_state`` is the state before the next batch."""

    def __init__(self, sampler: SliceSampler, source: Source, batch: int, ahead: int) -> None:
        self.sampler, self.source, self.batch = sampler, source, batch
        self.states: deque[dict[str, object]] = deque()
        self.ahead = ahead if isinstance(source, StreamingSource) else 0
        for _ in range(self.ahead):
            self._submit()

    def _submit(self) -> None:
        self.states.append(self.sampler.state())
        assert isinstance(self.source, StreamingSource)
        self.source.submit(self.sampler.draw(self.batch))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(self.source, StreamingSource):
            return self.source.batch(self.sampler.draw(self.batch))
        batch = self.source.next()  # consume first: the read-ahead queue is bounded
        self.states.popleft()
        self._submit()
        return batch

    def sampler_state(self) -> dict[str, object]:
        return self.states[0] if self.states else self.sampler.state()

    def close(self) -> None:
        if isinstance(self.source, StreamingSource):
            self.source.close()


@dataclass(frozen=True)
class _Dist:
    """Process-group facts; world 1 when not launched by torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> _Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend=backend)
        return cls(torch.distributed.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(tensor)
        return float(tensor.item()) / self.world

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


@dataclass
class _Horizon:
    """The steps the job trains: planned, or the time budget's cap once decided."""

    steps: int
    cap: StepCap | None = None

    def set_cap(self, cap: StepCap) -> None:
        self.cap, self.steps = cap, min(self.steps, cap.steps)

    @property
    def planned_if_cut(self) -> int | None:
        """The steps planned, where the cap trains fewer."""
        return self.cap.planned if self.cap is not None and self.cap.binding else None


@dataclass
class _Run:
    """Everything that changes while training, and what a checkpoint restores."""

    model: torch.nn.Module
    optimiser: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: SliceSampler
    gen: torch.Generator
    horizon: _Horizon
    step: int = 0
    best: float = -1.0


@dataclass(frozen=True)
class _Job:
    """What stays fixed while one stage trains: the loop and validation read it."""

    cfg: TrainConfig
    store: SliceStore
    val_ids: list[str]
    folder: StageDir
    identity: dict[str, Any]
    dist: _Dist
    record: dict[str, Any]  # config.json, rewritten when a time budget caps the steps


def _build(cfg: TrainConfig, table: SliceTable, device: torch.device, dist: _Dist) -> _Run:
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = model_for(cfg, cfg.encoder_weights).to(device)
    model = model.to(memory_format=torch.channels_last)  # faster on CUDA and on the CPU
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    horizon = _Horizon(cfg.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: lr_factor(s, cfg, horizon.steps)
    )
    sampler = SliceSampler(table, cfg.oversample, cfg.seed + 1000 * dist.rank)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1 + 1000 * dist.rank)
    return _Run(model, optimiser, scheduler, sampler, gen, horizon)


def _restore(run: _Run, state: dict[str, Any], dist: _Dist) -> None:
    run.model.load_state_dict(state["model"])
    run.optimiser.load_state_dict(state["optimiser"])
    run.scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"][dist.rank]
    run.sampler.set_state(rng["sampler"])
    run.gen.set_state(rng["augment"])
    torch.set_rng_state(rng["torch"])
    run.step, run.best = int(state["step"]), float(state["best"])
    if state.get("step_cap") is not None:  # the schedule decays over the recorded cap
        run.horizon.set_cap(StepCap.from_dict(state["step_cap"]))


def _state(
    run: _Run, stream: _BatchStream, identity: dict[str, Any], dist: _Dist
) -> dict[str, Any]:
    """Checkpoint content; RNG states of every rank, so a DDP run resumes exactly too."""
    rng = {
        "sampler": stream.sampler_state(),
        "augment": run.gen.get_state(),
        "torch": torch.get_rng_state(),
    }
    return {
        "model": run.model.state_dict(),
        "optimiser": run.optimiser.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "rng": dist.gather(rng),
        "step": run.step,
        "best": run.best,
        "identity": identity,
        "step_cap": run.horizon.cap.to_dict() if run.horizon.cap else None,
    }


def _weights_only(state: dict[str, Any]) -> dict[str, Any]:
    """What ``best.pt`` needs to predict: no optimiser, scheduler or RNG (a third of the bytes).

    Resuming always starts from ``last.pt``, which keeps the full state.
    """
    return {k: state[k] for k in ("model", "step", "best", "identity")}


def _one_step(
    run: _Run,
    fwd: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    losses: tuple[Any, Any],
) -> float:
    device = images.device
    images, labels = prepare_batch(images, labels, cfg)
    images, labels = augment_batch(images, labels, cfg.augment, run.gen)
    images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = fwd(images).float()
    loss = losses[0](logits, labels) + losses[1](logits, labels)
    run.optimiser.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.optimiser.step()
    run.scheduler.step()
    run.step += 1
    return float(loss.detach())


def train(
    store_path: Path,
    run_dir: Path,
    settings: Settings,
    *,
    resume: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    stage: Stage = "liver",
    cases: Mapping[str, Sequence[str]] | None = None,
) -> TrainResult:
    """Train one stage of ``settings``' model (``[train]`` for the liver stage,
    ``[tumour]`` for the tumour stage) on the store's train split into ``run_dir``.

    ``cases`` (``{"train": [...], "val": [...]}``, a versioned run's ``run.json``) fixes
    the exact cases; by default the store's train and val splits as they are now.

    Under ``torchrun`` (DDP: NCCL on CUDA, gloo on the CPU) each rank draws its own
    batches of ``batch_size``; rank 0 validates and writes every file.
    """
    started = _clock()
    cfg = settings.stage(stage)
    dist = _Dist.from_env()
    store = SliceStore.open(store_path)
    train_ids, val_ids = _cases(store, cases)
    require_train_cases(store_path, train_ids)
    device = dist.device()
    if not val_ids and dist.main:
        _log.warning(
            "%s: the store has no val cases, so no best checkpoint can be chosen: the run "
            "keeps last.pt only. Fix: preprocess 3 or more cases (one goes to val).",
            store_path,
        )
    _check_sizes(store, cfg)
    table, prepared = stage_table(store, train_ids, cfg, device)
    cfg = cfg.model_copy(update={"steps": resolve_steps(cfg, len(table), dist.world)})
    run = _build(cfg, table, device, dist)
    identity = _identity(cfg, store)
    folder = _fresh_folder(run_dir, dist)
    if resume and folder.last.exists():
        _restore(run, load_checkpoint(folder.last, identity), dist)
        if dist.main:
            _truncate_history(folder.history, run.step)
    record: dict[str, Any] = {}
    if dist.main:
        record = {
            **settings.model_dump(mode="json"),
            "store": str(store_path),
            "store_config_hash": identity["store_config_hash"],
            "store_config": store.meta.config,  # how to preprocess a new scan for this model
            "world_size": dist.world,
            "torch_threads": torch.get_num_threads(),  # its share of the cores (train-all slots)
            "stage": stage,
            "steps": run.horizon.steps,
            "step_cap": run.horizon.cap.to_dict() if run.horizon.cap else None,
        }
        write_json_atomic(folder.config, record)
    losses = (smp.losses.DiceLoss("multiclass", from_logits=True), torch.nn.CrossEntropyLoss())
    fwd: torch.nn.Module = run.model
    if dist.world > 1:
        fwd = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile and device.type == "cuda":
        fwd = torch.compile(fwd)  # type: ignore[assignment]
    source = make_source(cfg, store, table, prepared, run.sampler, device)
    stream = _BatchStream(run.sampler, source, cfg.batch_size, cfg.prefetch)
    try:
        job = _Job(cfg, store, val_ids, folder, identity, dist, record)
        budget = _budget(cfg, run, _clock() - started)  # the set-up counts against it
        loss = _loop(run, fwd, stream, losses, job, on_step, budget=budget)
    finally:
        stream.close()
    best = run.best if run.best >= 0 else math.nan
    planned = run.horizon.planned_if_cut
    threshold: float | None = None
    candidates: dict[str, float] = {}
    seed = TUMOUR_SEED  # the lesion seed that prediction applies by default
    if dist.main and stage == "tumour" and val_ids:
        threshold, candidates = _tune(run, run_dir, store, val_ids, cfg, seed)
    if dist.main:
        RunResult(
            steps=run.step,
            best_score=best,
            last_loss=loss,
            stage=stage,
            checkpoint=folder.best.name if val_ids else folder.last.name,
            selection=(
                f"best.pt: highest validation score over {len(val_ids)} val case(s)"
                if val_ids
                else "last.pt: the store has no val cases, so none could be chosen"
            ),
            tumour_threshold=threshold,
            thresholds_tried=dict(candidates),
            threshold_seed=seed if candidates else None,
            planned_steps=planned,
        ).write(folder)
    return TrainResult(run_dir, run.step, best, loss, planned)


def _fresh_folder(run_dir: Path, dist: _Dist) -> StageDir:
    """The stage's folder, without the result.json of an earlier end (written again)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    folder = StageDir(run_dir)
    if dist.main:
        folder.result.unlink(missing_ok=True)
    return folder


def require_train_cases(store_path: Path, train_ids: Sequence[str]) -> None:
    """Refuse to train without a train case, naming the store and the fix."""
    if not train_ids:
        raise LiverpipeError(
            store_path,
            "the store has no train cases",
            "preprocess more cases, or give train a share in [preprocess] split_fractions "
            "(stores made before 2026-11-29 could put a lone case in val: preprocess it "
            "into a new store)",
        )


def _cases(
    store: SliceStore, cases: Mapping[str, Sequence[str]] | None
) -> tuple[list[str], list[str]]:
    if cases is None:
        return store.cases("train"), store.cases("val")
    stored = set(store.cases())
    gone = sorted(c for split in ("train", "val") for c in cases.get(split, []) if c not in stored)
    if gone:
        raise LiverpipeError(
            store.root,
            f"the run's cases {gone} are no longer in the store",
            "start a new run (`liverpipe train-all` without --resume)",
        )
    return list(cases.get("train", [])), list(cases.get("val", []))


def _tune(
    run: _Run,
    run_dir: Path,
    store: SliceStore,
    val_ids: list[str],
    cfg: TrainConfig,
    seed: float,
) -> tuple[float | None, dict[str, float]]:
    """The tumour threshold of the checkpoint that predicts (best.pt), tuned on val with
    the lesion seed ``seed``."""
    device = next(run.model.parameters()).device
    best = StageDir(run_dir).best
    if best.is_file():
        run.model.load_state_dict(load_checkpoint(best)["model"])
    return tune_threshold(run.model, store, val_ids, cfg, device, seed)


def _check_sizes(store: SliceStore, cfg: TrainConfig) -> None:
    """The liver stage's downsampled slices must suit the encoders' stride."""
    size = store.meta.config.get("preprocess", {}).get("slice_size", [0, 0])
    unit = cfg.downsample * STRIDE
    if cfg.stage == "liver" and any(int(s) % unit for s in size):
        raise ConfigError(
            store.root,
            f"the store's slices are {size[0]} x {size[1]}, which [train] downsample = "
            f"{cfg.downsample} cannot average down to a multiple of {STRIDE}",
            f"use a downsample that divides the slice size into multiples of {STRIDE}, or "
            f"preprocess with slice_size a multiple of {unit}",
        )


def _loop(
    run: _Run,
    fwd: torch.nn.Module,
    stream: _BatchStream,
    losses: tuple[Any, Any],
    job: _Job,
    on_step: Callable[[int, float], None] | None,
    *,
    budget: StepBudget | None = None,
) -> float:
    cfg, dist = job.cfg, job.dist
    device = next(run.model.parameters()).device
    loss, wait, clock = float("nan"), 0.0, time.perf_counter()
    history = job.folder.history.open("a") if dist.main else None
    try:
        while run.step < run.horizon.steps:
            run.model.train()
            started = _clock()
            t0 = time.perf_counter()
            images, labels = stream.next()
            images, labels = (
                images.to(device, non_blocking=True),
                labels.to(device, non_blocking=True),
            )
            wait += time.perf_counter() - t0
            loss = dist.mean(_one_step(run, fwd, images, labels, cfg, losses))
            if budget is not None:
                cap = budget.observe(run.step, _clock() - started)
                if cap is not None:
                    _apply_cap(run, job, min(dist.gather(cap), key=lambda c: c.steps), history)
            if on_step:
                on_step(run.step, loss)
            last = run.step == run.horizon.steps
            if run.step % cfg.log_every == 0 or last:
                elapsed = time.perf_counter() - clock
                if history:
                    history.write(
                        _json_line(
                            {
                                "step": run.step,
                                "loss": loss,
                                "lr": run.scheduler.get_last_lr()[0],
                                "images_per_s": dist.world
                                * cfg.batch_size
                                * cfg.log_every
                                / elapsed,
                                "data_wait": wait / elapsed,
                            }
                        )
                    )
                wait, clock = 0.0, time.perf_counter()
            if run.step % cfg.val_every == 0 or last:
                _validate_and_save(run, stream, job, history)
    finally:
        if history:
            history.close()
    return loss


#: The clock the time budget reads (a test replaces it).
_clock = time.perf_counter


def _budget(cfg: TrainConfig, run: _Run, setup: float) -> StepBudget | None:
    """The time budget still to decide (``setup`` seconds spent): none without
    ``max_minutes`` or once capped."""
    if cfg.max_minutes is None or run.horizon.cap is not None:
        return None
    return StepBudget(cfg.max_minutes, run.horizon.steps, run.step, spent=setup)


def _apply_cap(run: _Run, job: _Job, cap: StepCap, history: Any) -> None:
    """Train ``cap.steps`` from now on (the slowest rank's cap under DDP), and say so in
    history.jsonl and config.json."""
    run.horizon.set_cap(cap)
    if not job.dist.main:
        return
    history.write(_json_line({"step": run.step, "budget": cap.to_dict()}))
    write_json_atomic(
        job.folder.config, {**job.record, "steps": run.horizon.steps, "step_cap": cap.to_dict()}
    )
    if cap.binding:
        _log.warning(
            "%s: at %.3f s a step, %s of the %s planned steps fit in max_minutes = %.2f, so "
            "the job trains %s (the schedule decays over them). For all steps: raise "
            "max_minutes, or train on a faster machine.",
            job.folder.path,
            cap.seconds_per_step,
            cap.steps,
            cap.planned,
            cap.max_minutes,
            cap.steps,
        )
    if cap.steps < job.cfg.warmup_steps:
        _log.warning(
            "%s: the time budget's %s steps end inside the warmup of %s steps, so the "
            "learning rate never decays. Fix: lower warmup_steps or raise max_minutes.",
            job.folder.path,
            cap.steps,
            job.cfg.warmup_steps,
        )


def _validate_and_save(run: _Run, stream: _BatchStream, job: _Job, history: Any) -> None:
    dist = job.dist
    device = next(run.model.parameters()).device
    metrics = (
        validate(run.model, job.store, job.val_ids, job.cfg, device)
        if job.val_ids and dist.main
        else None
    )
    # Without val cases nothing can pick a best checkpoint: last.pt is the model.
    score = metrics["score"] if metrics else math.nan
    improved = not math.isnan(score) and score > run.best
    if improved:
        run.best = score
    state = _state(run, stream, job.identity, dist)  # collective: every rank takes part
    if dist.main:
        history.write(_json_line({"step": run.step, "val": metrics}))
        history.flush()
        if improved:
            save_checkpoint(job.folder.best, _weights_only(state))
        save_checkpoint(job.folder.last, state)
    dist.barrier()


def main(argv: list[str] | None = None) -> None:
    """``torchrun --nproc_per_node=N -m liverpipe.train --store S --model M --out RUN``."""
    parser = argparse.ArgumentParser(prog="python -m liverpipe.train", description=main.__doc__)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model")
    parser.add_argument("--config", type=Path)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--settings", type=Path, help="Resolved settings as JSON (train-all).")
    parser.add_argument("--stage", choices=("liver", "tumour"), default="liver")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--run-record", type=Path, help="run.json whose cases to train on.")
    args = parser.parse_args(argv)
    section = "train" if args.stage == "liver" else "tumour"
    if args.settings is not None:
        settings = Settings.model_validate_json(args.settings.read_text())
    else:
        settings = load_settings(
            args.config,
            {section: {"model": args.model, "steps": args.steps, "batch_size": args.batch_size}},
        )
    try:
        cases = RunRecord.read(args.run_record.parent).cases if args.run_record else None
        result = train(
            args.store, args.out, settings, resume=args.resume, stage=args.stage, cases=cases
        )
        if _Dist.from_env().main:
            model = settings.stage(args.stage).model
            print(f"trained {model} ({args.stage}) for {result.steps_text} into {args.out}")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _json_line(record: dict[str, Any]) -> str:
    """One strict-JSON history line: NaN (undefined Dice) becomes null."""
    return json.dumps(strict_json(record), allow_nan=False) + "\n"


def _truncate_history(path: Path, step: int) -> None:
    """Drop history lines written after the checkpoint being resumed from."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


if __name__ == "__main__":
    main()
