"""What differs between the two stages while training: batches and validation.

- Liver (stage 1): whole stored slices, foreground-oversampled, streamed or resident,
  averaged down by ``downsample`` on the device (labels by block majority).
- Tumour (stage 2): 2.5D crops inside the liver's ROI, liver-relative
  (:class:`~liverpipe.train.sampling.RoiSource`), tumour slices oversampled.

Validation scores each stage the way it is used: stage 1 on whole stored cases, stage 2
inside the ground-truth liver's ROI; both by Dice pooled over the val cases per class
(:func:`~liverpipe.evaluate.metrics.pooled_score`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from liverpipe.evaluate import case_counts, case_dice, pooled_score
from liverpipe.infer import (
    StageModels,
    decide,
    pool,
    pool_labels,
    predict_probabilities,
    tumour_stage,
)
from liverpipe.roi import liver_box, relative_gain
from liverpipe.settings import TUMOUR_SEED, TrainConfig
from liverpipe.train.sampling import (
    ResidentSource,
    RoiSource,
    SliceSampler,
    SliceTable,
    StreamingSource,
    decode_scale,
)
from storage import SliceStore

__all__ = [
    "THRESHOLDS",
    "Source",
    "make_source",
    "pick_threshold",
    "prepare_batch",
    "resolve_steps",
    "stage_table",
    "tune_threshold",
    "validate",
]

Source = ResidentSource | StreamingSource | RoiSource

#: Bytes a resident voxel takes: a float16 image and a uint8 label on the device; on the
#: CPU the image is held decoded (float32).
RESIDENT_BYTES = {"device": 3, "cpu": 5}


def stage_table(
    store: SliceStore, case_ids: list[str], cfg: TrainConfig, device: torch.device
) -> tuple[SliceTable, Any]:
    """The rows a stage samples from, and what its source needs prepared (ROI regions)."""
    if cfg.stage == "tumour":
        return RoiSource.prepare(store, case_ids, cfg, device)
    return SliceTable.from_store(store, case_ids), None


def make_source(
    cfg: TrainConfig,
    store: SliceStore,
    table: SliceTable,
    prepared: Any,
    sampler: SliceSampler,
    device: torch.device,
) -> Source:
    """The batch source of a stage. The liver stage holds the train split in device memory
    when it fits ``resident_budget_gb`` (on the CPU too: measured 64 vs 47 images/s for
    UNet++ at 64², docs/benchmarks.md), else streams it from Zarr."""
    if cfg.stage == "tumour":
        return RoiSource(store, table, cfg, device, sampler.rng, prepared)
    per_voxel = RESIDENT_BYTES["cpu" if device.type == "cpu" else "device"]
    bytes_needed = sum(int(np.prod(store.case(c).meta.shape)) * per_voxel for c in table.case_ids)
    fits = bytes_needed < cfg.resident_budget_gb * 1e9
    resident = cfg.resident == "always" or (cfg.resident == "auto" and fits)
    if resident:
        return ResidentSource(store, table, cfg.context_slices, device)
    return StreamingSource(
        store,
        table,
        cfg.context_slices,
        cfg.stream_threads,
        cfg.prefetch,
        int(cfg.stream_cache_gb * 2**30),
    )


def resolve_steps(cfg: TrainConfig, rows: int, world: int) -> int:
    """``steps``, or ``epochs`` over ``rows`` sampled slices in batches of the world."""
    if cfg.epochs is None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * rows / (cfg.batch_size * world)))


def prepare_batch(
    images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The liver stage reads slices averaged down by ``downsample``; the tumour stage's
    crops come ready."""
    if cfg.stage == "liver" and cfg.downsample > 1:
        return pool(images, cfg.downsample), pool_labels(labels, cfg.downsample)
    return images, labels


#: Tumour-probability thresholds tried on the val split after the tumour stage trains.
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def tune_threshold(
    model: torch.nn.Module,
    store: SliceStore,
    case_ids: list[str],
    cfg: TrainConfig,
    device: torch.device,
    seed: float = TUMOUR_SEED,
) -> tuple[float | None, dict[str, float]]:
    """:func:`pick_threshold` on stage 2's softmax inside the val cases' ground-truth
    liver ROIs."""
    rois = (_oracle_roi(model, store, case_id, cfg, device) for case_id in case_ids)
    return pick_threshold(((p, t) for p, t in rois if p is not None), seed)


def pick_threshold(
    cases: Iterable[tuple[np.ndarray, np.ndarray]], seed: float = TUMOUR_SEED
) -> tuple[float | None, dict[str, float]]:
    """The tumour threshold with the best tumour Dice pooled over ``cases`` (softmax
    (3, ...), labels) (ties: the lower), and every candidate's score; None when no case
    has tumour. Each candidate is decided as prediction decides: lesions must reach
    ``seed`` (:func:`~liverpipe.infer.decide`; 0: no seed)."""
    counts: dict[float, list[dict[str, tuple[int, int, int]]]] = {t: [] for t in THRESHOLDS}
    for probs, truth in cases:
        for t in THRESHOLDS:
            counts[t].append(case_counts(decide(probs, t, seed), truth))
    scores = {t: pooled_score(c)["tumour"] if c else math.nan for t, c in counts.items()}
    record = {str(t): v for t, v in scores.items()}
    finite = {t: v for t, v in scores.items() if not math.isnan(v)}
    if not finite or not any(c["tumour"][0] + c["tumour"][2] for c in counts[0.5]):
        return None, record
    best = max(finite.values())
    return min(t for t, v in finite.items() if v == best), record


def _oracle_roi(
    model: torch.nn.Module, store: SliceStore, case_id: str, cfg: TrainConfig, device: torch.device
) -> tuple[np.ndarray | None, np.ndarray]:
    """Stage 2's softmax and the labels inside a case's ground-truth liver ROI."""
    image, label = store.case(case_id).load()
    if liver_box(label > 0) is None:
        return None, label
    scale, offset = decode_scale(store, case_id)
    decoded = image.astype(np.float32) * scale + offset
    meta = store.case(case_id).meta
    oracle = np.eye(3, dtype=np.float32)[np.minimum(label, 1)].transpose(3, 0, 1, 2)
    stage = StageModels(
        [model],
        cfg.context_slices,
        margin_mm=cfg.roi_margin_mm,
        gain=relative_gain(meta.intensity.hu_scale, cfg.relative_window_hu),
        clip=cfg.relative_clip,
    )
    result = tumour_stage(oracle, decoded, meta.spacing, stage, device)
    assert result.roi is not None
    return result.final[(slice(None), *result.roi.slices)], label[result.roi.slices]


def validate(
    model: torch.nn.Module,
    store: SliceStore,
    case_ids: list[str],
    cfg: TrainConfig,
    device: torch.device,
) -> dict[str, Any]:
    """Pooled Dice over ``case_ids`` per class and ``score``, their mean over the classes
    present; per-case Dice kept for the record. The tumour stage is scored inside each
    case's ground-truth liver ROI (what stage 2 sees after a perfect stage 1)."""
    cases, counts = {}, []
    for case_id in case_ids:
        image, label = store.case(case_id).load()
        scale, offset = decode_scale(store, case_id)
        decoded = image.astype(np.float32) * scale + offset
        if cfg.stage == "liver":
            probs = predict_probabilities(
                [model], decoded, cfg.context_slices, device, downsample=cfg.downsample
            )
            pred, truth = probs.argmax(0).astype(np.uint8), label
        else:
            roi_probs, truth = _oracle_roi(model, store, case_id, cfg, device)
            if roi_probs is None:
                continue
            pred = decide(roi_probs)
        cases[case_id] = case_dice(pred, truth)
        counts.append(case_counts(pred, truth))
    pooled = pooled_score(counts)
    return {
        "score": pooled["score"],
        "liver_dice": pooled["liver"],
        "tumour_dice": pooled["tumour"],
        "cases": cases,
    }
