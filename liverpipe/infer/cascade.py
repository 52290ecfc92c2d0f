"""The two-stage cascade on one scan's model grid: liver on whole slices, then liver and
tumour inside the liver's bounding box at full resolution.

1. Stage 1 (:func:`liver_stage`): every slice, averaged down by the stage's
   ``downsample``, softmax interpolated back up (an ensemble averages it).
2. Its largest liver component gives the ROI: bounding box plus ``roi_margin_mm``.
3. Stage 2 (:func:`tumour_stage`) reads the ROI (in-plane grown to the encoders'
   stride, real image around it) relative to the liver's median and predicts liver and
   tumour there; its softmax replaces stage 1's inside the ROI.

Outside the ROI the cascade is stage 1's. No liver found: stage 1's output and a warning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import cc3d
import numpy as np
import torch

from liverpipe.infer.volume import keep_seeded_lesions, predict_probabilities
from liverpipe.roi import (
    Box,
    crop,
    fit_to_multiple,
    grow,
    liver_box,
    liver_median,
    margin_voxels,
    relative,
)
from liverpipe.settings import STRIDE

__all__ = [
    "CascadeResult",
    "StageModels",
    "decide",
    "largest_liver",
    "liver_stage",
    "tumour_stage",
]


@dataclass(frozen=True, eq=False)
class StageModels:
    """One stage's models (an ensemble of one or more) and how they read the image."""

    models: Sequence[torch.nn.Module]
    context: int
    flips: Sequence[tuple[int, ...]] = ((),)
    downsample: int = 1  # liver stage
    margin_mm: float = 0.0  # tumour stage: ROI margin
    gain: float = 1.0  # tumour stage: stored units -> liver-relative units
    clip: bool = False  # tumour stage: liver-relative input clipped to [-1, 1]


@dataclass(frozen=True, eq=False)
class CascadeResult:
    """Stage-1 and cascade softmax (C, Z, Y, X) on the model grid, the ROI, warnings."""

    liver: np.ndarray
    final: np.ndarray
    roi: Box | None
    warnings: list[str] = field(default_factory=list)


def largest_liver(probs: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of argmax >= 1 (liver or tumour), as a mask."""
    liver = np.ascontiguousarray(probs.argmax(0) >= 1)
    if not liver.any():
        return liver
    return cc3d.largest_k(liver, k=1, connectivity=26) > 0


def liver_stage(image: np.ndarray, stage: StageModels, device: torch.device) -> np.ndarray:
    """Stage 1's mean softmax (C, Z, Y, X) over its models on a (Z, Y, X) image."""
    return predict_probabilities(
        stage.models,
        image,
        stage.context,
        device,
        flips=stage.flips,
        downsample=stage.downsample,
    )


def tumour_stage(
    liver_probs: np.ndarray,
    image: np.ndarray,
    spacing: Sequence[float],
    stage: StageModels | None,
    device: torch.device,
) -> CascadeResult:
    """The cascade from stage 1's softmax: stage 2 inside the liver ROI.

    ``image`` is the (Z, Y, X) normalised model input, ``spacing`` its (x, y, z) voxel
    size in mm. Without a tumour stage the result is stage 1's.
    """
    if stage is None:
        return CascadeResult(liver_probs, liver_probs, None)
    liver = largest_liver(liver_probs)
    box = liver_box(liver)
    if box is None:
        return CascadeResult(
            liver_probs,
            liver_probs,
            None,
            ["stage 1 found no liver, so the tumour stage did not run: the mask is empty"],
        )
    roi = grow(box, margin_voxels(stage.margin_mm, spacing)).clip(image.shape)
    window = fit_to_multiple(roi, STRIDE)
    half = stage.context // 2
    read = Box(max(roi.z0 - half, 0), min(roi.z1 + half, image.shape[0]), *_in_plane(window))
    patch = crop(image, read, float(image.min()))
    inputs = relative(patch, liver_median(image, liver), stage.gain, stage.clip)
    probs = predict_probabilities(stage.models, inputs, stage.context, device, flips=stage.flips)
    final = liver_probs.copy()
    final[(slice(None), *roi.slices)] = probs[
        :,
        roi.z0 - read.z0 : roi.z1 - read.z0,
        roi.y0 - read.y0 : roi.y1 - read.y0,
        roi.x0 - read.x0 : roi.x1 - read.x0,
    ]
    return CascadeResult(liver_probs, final, roi)


def _in_plane(box: Box) -> tuple[int, int, int, int]:
    return box.y0, box.y1, box.x0, box.x1


def decide(probs: np.ndarray, threshold: float | None = None, seed: float = 0.0) -> np.ndarray:
    """Labels (uint8) from softmax (3, ...): argmax, or with ``threshold`` foreground where
    liver + tumour outweigh background, tumour where its own probability reaches it; then,
    with ``seed`` > 0, only lesions that reach ``seed`` somewhere stay tumour
    (:func:`~liverpipe.infer.volume.keep_seeded_lesions`). Prediction and the threshold
    tuning both decide here, so they apply one rule."""
    if threshold is None:
        labels = probs.argmax(0).astype(np.uint8)
    else:
        foreground = probs[1] + probs[2] > probs[0]
        labels = np.where(foreground, np.where(probs[2] >= threshold, 2, 1), 0).astype(np.uint8)
    return keep_seeded_lesions(labels, probs[2], seed) if seed > 0 else labels
