"""Segmentation metrics, per case and per class (liver = labels 1 and 2, tumour = 2).

Overlap (Dice, Jaccard, precision, recall, pixel accuracy), surface distances in mm
(HD95, ASSD; spacing-aware), relative volume difference, and lesion-wise detection.
Every function is pure and works on one case's arrays; aggregation lives in
:mod:`liverpipe.report`.

The empty-ground-truth rule (:data:`EMPTY_RULE`) is applied by every function here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cc3d
import numpy as np
from scipy import ndimage

from liverpipe.labels import Label

__all__ = [
    "CLASSES",
    "EMPTY_RULE",
    "LESION_RULE",
    "LesionCounts",
    "case_dice",
    "case_metrics",
    "class_masks",
    "dice",
    "lesion_detection",
    "overlap",
    "surface_distances",
]

CLASSES = ("liver", "tumour")

EMPTY_RULE = (
    "A class absent from both the ground truth and the prediction is a true-negative case: "
    "its overlap and distance metrics are undefined (NaN) and left out of means. Any other "
    "0/0 ratio is 0: a class present in the ground truth but not predicted has Dice, "
    "Jaccard and recall 0; predicted but absent from the ground truth, it has Dice, "
    "Jaccard and precision 0. Surface distances (HD95, ASSD) and the relative volume "
    "difference are undefined when either mask (RVD: the ground truth) is empty, and are "
    "left out of means; Dice already scores those cases 0."
)

#: Overlap a lesion needs with the other side's components to count as found.
LESION_DICE = 0.2
LESION_RULE = (
    "Lesions are the 26-connected components of the tumour label. A ground-truth lesion "
    f"is detected when its Dice with the union of the predicted components touching it is "
    f"at least {LESION_DICE} (LiTS-style, lenient); a predicted component is a true "
    f"positive when its Dice with the union of the ground-truth lesions touching it is at "
    f"least {LESION_DICE}. Lesion recall = detected / ground-truth lesions, precision = "
    "true-positive / predicted components, F1 their harmonic mean; totals pool the counts "
    "over cases."
)


def class_masks(label: np.ndarray) -> dict[str, np.ndarray]:
    """Liver (labels 1 and 2) and tumour (label 2) masks of a label volume."""
    return {"liver": label >= Label.LIVER, "tumour": label == Label.TUMOUR}


def _ratio(num: int, den: int, both_empty: bool) -> float:
    if both_empty:
        return math.nan
    return num / den if den else 0.0


def overlap(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice, Jaccard, precision, recall, accuracy and RVD of two boolean masks."""
    p, t = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    tp = int(np.count_nonzero(p & t))
    n_p, n_t = int(np.count_nonzero(p)), int(np.count_nonzero(t))
    fp, fn = n_p - tp, n_t - tp
    empty = n_p == 0 and n_t == 0
    return {
        "dice": _ratio(2 * tp, n_p + n_t, empty),
        "jaccard": _ratio(tp, tp + fp + fn, empty),
        "precision": _ratio(tp, n_p, empty),
        "recall": _ratio(tp, n_t, empty),
        "accuracy": (p.size - fp - fn) / p.size,
        "rvd": (n_p - n_t) / n_t if n_t else math.nan,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "voxels": int(p.size),
    }


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty."""
    return overlap(pred, truth)["dice"]


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: the mask minus its 6-connected erosion (MONAI's definition)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def surface_distances(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]
) -> dict[str, float]:
    """HD95 and ASSD in mm between the surfaces of two boolean masks.

    ``spacing`` is the voxel size along the arrays' axes, in their order. HD95 is the
    larger of the two directed 95th percentiles; ASSD is the mean of all surface-to-surface
    distances of both directions. NaN when either mask is empty. The work is done inside
    the masks' joint bounding box, so a full-size scan costs what its organ costs.
    """
    p, t = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if not p.any() or not t.any():
        return {"hd95": math.nan, "assd": math.nan}
    box = ndimage.find_objects((p | t).astype(np.uint8))[0]
    box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
    p_surface, t_surface = _surface(p[box]), _surface(t[box])
    sampling = [float(s) for s in spacing]
    to_t = ndimage.distance_transform_edt(~t_surface, sampling=sampling)[p_surface]
    to_p = ndimage.distance_transform_edt(~p_surface, sampling=sampling)[t_surface]
    hd95 = max(float(np.percentile(to_t, 95)), float(np.percentile(to_p, 95)))
    assd = float(np.concatenate([to_t, to_p]).mean())
    return {"hd95": hd95, "assd": assd}


@dataclass(frozen=True)
class LesionCounts:
    """Lesion-wise detection counts of one case (see :data:`LESION_RULE`)."""

    true_lesions: int
    detected: int
    predicted: int
    true_positive: int

    @property
    def recall(self) -> float:
        return self.detected / self.true_lesions if self.true_lesions else math.nan

    @property
    def precision(self) -> float:
        return self.true_positive / self.predicted if self.predicted else math.nan

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        if math.isnan(p) or math.isnan(r):
            return math.nan
        return 2 * p * r / (p + r) if p + r else 0.0

    def __add__(self, other: LesionCounts) -> LesionCounts:
        return LesionCounts(
            self.true_lesions + other.true_lesions,
            self.detected + other.detected,
            self.predicted + other.predicted,
            self.true_positive + other.true_positive,
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "true_lesions": self.true_lesions,
            "detected": self.detected,
            "predicted": self.predicted,
            "true_positive": self.true_positive,
            "recall": self.recall,
            "precision": self.precision,
            "f1": self.f1,
        }


def _found(components: np.ndarray, count: int, other: np.ndarray) -> int:
    """How many of ``components`` (labels 1..count) reach LESION_DICE with ``other``."""
    if count == 0:
        return 0
    other_sizes = np.bincount(other.ravel())
    found = 0
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        own = components[box] == index
        size = int(own.sum())
        touching = np.unique(other[box][own])
        touching = touching[touching > 0]
        if touching.size == 0:
            continue
        union_size = int(other_sizes[touching].sum())
        inter = int((own & np.isin(other[box], touching)).sum())
        if 2 * inter / (size + union_size) >= LESION_DICE:
            found += 1
    return found


def lesion_detection(pred_tumour: np.ndarray, true_tumour: np.ndarray) -> LesionCounts:
    """Lesion-wise detection counts of one case's tumour masks."""
    truth, n_true = cc3d.connected_components(
        np.ascontiguousarray(true_tumour, dtype=bool), connectivity=26, return_N=True
    )
    pred, n_pred = cc3d.connected_components(
        np.ascontiguousarray(pred_tumour, dtype=bool), connectivity=26, return_N=True
    )
    return LesionCounts(
        int(n_true), _found(truth, int(n_true), pred), int(n_pred), _found(pred, int(n_pred), truth)
    )


def case_dice(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Per-class Dice of one case's predicted and true label volumes (validation)."""
    p, t = class_masks(pred), class_masks(truth)
    return {name: dice(p[name], t[name]) for name in CLASSES}


def case_metrics(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]
) -> dict[str, object]:
    """Every metric of one case: per class overlap and distances, lesions, accuracy.

    ``pred`` and ``truth`` are label volumes (0, 1, 2) on the same grid, ``spacing`` its
    voxel size along the arrays' axes in mm.
    """
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {truth.shape} differ in shape")
    p, t = class_masks(pred), class_masks(truth)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    classes: dict[str, dict[str, float]] = {}
    for name in CLASSES:
        row = overlap(p[name], t[name]) | surface_distances(p[name], t[name], spacing)
        row["volume_pred_ml"] = (row["tp"] + row["fp"]) * voxel_ml
        row["volume_true_ml"] = (row["tp"] + row["fn"]) * voxel_ml
        classes[name] = row
    return {
        "pixel_accuracy": float(np.count_nonzero(pred == truth)) / pred.size,
        "classes": classes,
        "lesions": lesion_detection(p["tumour"], t["tumour"]).as_dict(),
    }
