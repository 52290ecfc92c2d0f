"""Training one segmentation model on the slice store: small functions, one config.

``train`` runs the loop: foreground-oversampled 2.5D batches (device-resident or
streamed), on-device augmentation, Dice + cross-entropy, AdamW with warmup then cosine
or poly decay, gradient clipping, validation on the val split every N steps (3D Dice
per case), ``last.pt`` / ``best.pt``, ``config.json`` and ``history.jsonl``. ``--resume``
restores model, optimiser, scheduler and every RNG, so the resumed history equals an
uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import segmentation_models_pytorch as smp
import torch

from liverpipe.augment import augment_batch
from liverpipe.errors import LiverpipeError
from liverpipe.metrics import case_dice
from liverpipe.models import build_model
from liverpipe.sampling import (
    ResidentSource,
    SliceSampler,
    SliceTable,
    StreamingSource,
    decode_scale,
)
from liverpipe.settings import Settings, TrainConfig
from storage import SliceStore
from storage.reader import window_indices

__all__ = [
    "CheckpointMismatchError",
    "TrainResult",
    "lr_factor",
    "predict_volume",
    "train",
    "validate",
]

#: Train settings that may differ between a run and its resume.
RUNTIME_FIELDS = frozenset(
    {
        "steps",
        "val_every",
        "log_every",
        "resident",
        "resident_budget_gb",
        "stream_threads",
        "prefetch",
        "compile",
    }
)


class CheckpointMismatchError(LiverpipeError):
    """A checkpoint made for another model config or another store config."""


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    steps: int
    best_score: float
    last_loss: float


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier: linear warmup, then cosine or poly decay to 0."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return (1.0 - progress) ** 0.9


def _identity(cfg: TrainConfig, store: SliceStore) -> dict[str, Any]:
    model_cfg = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RUNTIME_FIELDS}
    return {"train": model_cfg, "store_config_hash": store.meta.config_hash}


def load_checkpoint(path: Path, expected: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); refuse a foreign one."""
    if not path.is_file():
        raise LiverpipeError(
            path,
            "no checkpoint here",
            "train the model first, or pass the run folder that has last.pt",
        )
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    if expected is not None and state.get("identity") != expected:
        theirs = state.get("identity", {})
        diff = sorted(
            k
            for k in set(theirs.get("train", {})) | set(expected["train"])
            if theirs.get("train", {}).get(k) != expected["train"].get(k)
        )
        if theirs.get("store_config_hash") != expected["store_config_hash"]:
            diff.append("store config (preprocessing)")
        raise CheckpointMismatchError(
            path,
            f"this checkpoint was made with a different configuration ({', '.join(diff)})",
            "resume with the config and store the run was started with, or train into a new --out folder",
        )
    return state


def _save(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def predict_volume(
    model: torch.nn.Module, image: np.ndarray, k: int, device: torch.device, batch: int = 16
) -> np.ndarray:
    """Argmax labels (Z, Y, X) uint8 of a normalised (Z, Y, X) volume, 2.5D slice by slice."""
    model.eval()
    depth = image.shape[0]
    volume = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).to(device)
    out = np.empty(image.shape, dtype=np.uint8)
    for start in range(0, depth, batch):
        zs = range(start, min(start + batch, depth))
        stacks = torch.stack(
            [volume[torch.from_numpy(window_indices(z, k, depth)).to(device)] for z in zs]
        )
        logits = model(stacks)
        out[start : start + len(zs)] = logits.argmax(1).to(torch.uint8).cpu().numpy()
    return out


def validate(
    model: torch.nn.Module, store: SliceStore, case_ids: list[str], k: int, device: torch.device
) -> dict[str, Any]:
    """Per-case 3D Dice (liver, tumour) on the stored grid, and their means."""
    cases = {}
    for case_id in case_ids:
        image, label = store.case(case_id).load()
        scale, offset = decode_scale(store, case_id)
        pred = predict_volume(model, image.astype(np.float32) * scale + offset, k, device)
        cases[case_id] = case_dice(pred, label)
    liver = [c["liver"] for c in cases.values()]
    tumour = [c["tumour"] for c in cases.values()]
    per_case = [_nanmean([c["liver"], c["tumour"]]) for c in cases.values()]
    return {
        "liver_dice": _nanmean(liver),
        "tumour_dice": _nanmean(tumour),
        "mean_fg_dice": _nanmean(per_case),
        "cases": cases,
    }


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


class _BatchStream:
    """Batches in sampler order; ``sampler_state`` is the state before the next batch."""

    def __init__(
        self,
        sampler: SliceSampler,
        source: ResidentSource | StreamingSource,
        batch: int,
        ahead: int,
    ) -> None:
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
        if isinstance(self.source, ResidentSource):
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


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _source(
    cfg: TrainConfig, store: SliceStore, table: SliceTable, device: torch.device
) -> ResidentSource | StreamingSource:
    bytes_needed = sum(int(np.prod(store.case(c).meta.shape)) * 3 for c in table.case_ids)
    fits = bytes_needed < cfg.resident_budget_gb * 1e9
    resident = cfg.resident == "always" or (
        cfg.resident == "auto" and device.type == "cuda" and fits
    )
    if resident:
        return ResidentSource(store, table, cfg.context_slices, device)
    return StreamingSource(store, table, cfg.context_slices, cfg.stream_threads, cfg.prefetch)


def train(
    store_path: Path,
    run_dir: Path,
    settings: Settings,
    resume: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train ``settings.train.model`` on the store's train split into ``run_dir``."""
    cfg = settings.train
    store = SliceStore.open(store_path)
    train_ids, val_ids = store.cases("train"), store.cases("val")
    if not train_ids:
        raise LiverpipeError(
            store_path,
            "the store has no train cases",
            "preprocess more cases (splits are 70/15/15 by case)",
        )
    device = _device()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.encoder, cfg.context_slices, 3, cfg.encoder_weights).to(
        device
    )
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: lr_factor(s, cfg))
    table = SliceTable.from_store(store, train_ids)
    sampler = SliceSampler(table, cfg.oversample, cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    identity = _identity(cfg, store)
    run_dir.mkdir(parents=True, exist_ok=True)
    step, best = 0, -1.0
    if resume and (run_dir / "last.pt").exists():
        state = load_checkpoint(run_dir / "last.pt", identity)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.set_state(state["sampler"])
        gen.set_state(state["augment_rng"])
        torch.set_rng_state(state["torch_rng"])
        step, best = int(state["step"]), float(state["best"])
        _truncate_history(run_dir / "history.jsonl", step)
    (run_dir / "config.json").write_text(
        json.dumps({**settings.model_dump(mode="json"), **identity}, indent=2)
    )
    dice_ce = (smp.losses.DiceLoss("multiclass", from_logits=True), torch.nn.CrossEntropyLoss())
    stream = _BatchStream(sampler, _source(cfg, store, table, device), cfg.batch_size, cfg.prefetch)
    fwd = torch.compile(model) if cfg.compile and device.type == "cuda" else model
    loss_value, wait, clock = float("nan"), 0.0, time.perf_counter()
    try:
        with (run_dir / "history.jsonl").open("a") as history:
            while step < cfg.steps:
                model.train()
                t0 = time.perf_counter()
                images, labels = stream.next()
                images, labels = (
                    images.to(device, non_blocking=True),
                    labels.to(device, non_blocking=True),
                )
                wait += time.perf_counter() - t0
                images, labels = augment_batch(images, labels, cfg.augment, gen)
                if device.type == "cuda":
                    images = images.contiguous(memory_format=torch.channels_last)
                with torch.autocast(
                    device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
                ):
                    logits = fwd(images)
                    loss = dice_ce[0](logits.float(), labels) + dice_ce[1](logits.float(), labels)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimiser.step()
                scheduler.step()
                step += 1
                loss_value = float(loss.detach())
                if on_step:
                    on_step(step, loss_value)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    elapsed = time.perf_counter() - clock
                    record = {
                        "step": step,
                        "loss": loss_value,
                        "lr": scheduler.get_last_lr()[0],
                        "images_per_s": cfg.batch_size * cfg.log_every / elapsed
                        if elapsed > 0
                        else 0.0,
                        "data_wait": wait / elapsed if elapsed > 0 else 0.0,
                    }
                    history.write(_json_line(record))
                    wait, clock = 0.0, time.perf_counter()
                if step % cfg.val_every == 0 or step == cfg.steps:
                    metrics = (
                        validate(model, store, val_ids, cfg.context_slices, device)
                        if val_ids
                        else None
                    )
                    score = metrics["mean_fg_dice"] if metrics else -loss_value
                    history.write(_json_line({"step": step, "val": metrics}))
                    state = {
                        "model": model.state_dict(),
                        "optimiser": optimiser.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "sampler": stream.sampler_state(),
                        "augment_rng": gen.get_state(),
                        "torch_rng": torch.get_rng_state(),
                        "step": step,
                        "best": max(best, score) if not math.isnan(score) else best,
                        "identity": identity,
                    }
                    if not math.isnan(score) and score > best:
                        best = score
                        _save(run_dir / "best.pt", state)
                    _save(run_dir / "last.pt", state)
                    history.flush()
    finally:
        stream.close()
    return TrainResult(run_dir, step, best, loss_value)


def _json_line(record: dict[str, Any]) -> str:
    """One strict-JSON history line: NaN (undefined Dice) becomes null."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, float) and math.isnan(value):
            return None
        return value

    return json.dumps(clean(record), allow_nan=False) + "\n"


def _truncate_history(path: Path, step: int) -> None:
    """Drop history lines written after the checkpoint being resumed from."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))
