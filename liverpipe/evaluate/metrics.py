"""Segmentation metrics, per case and per class (liver = labels 1 and 2, tumour = 2).

Overlap (Dice, Jaccard, precision, recall, pixel accuracy), surface distances in mm
(HD95, ASSD; spacing-aware), relative volume difference, and lesion-wise detection.
Every function is pure and works on one case's arrays; :func:`case_metrics` returns
them as a typed :class:`CaseMetrics`, and aggregation over cases lives in
:mod:`liverpipe.evaluate.records`.

The empty-ground-truth rule (:func:`empty_rule_text`, LiTS by default) is applied by
every function here that takes ``empty_rule``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import cc3d
import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from liverpipe.labels import Label
from liverpipe.roi import bounding_box

__all__ = [
    "CLASSES",
    "EMPTY_RULE",
    "LESION_RULE",
    "CaseMetrics",
    "ClassScore",
    "EmptyRule",
    "LesionCounts",
    "balanced_accuracy",
    "case_counts",
    "case_dice",
    "case_metrics",
    "class_masks",
    "confusion",
    "dice",
    "empty_rule_text",
    "lesion_detection",
    "overlap",
    "overlap_from_counts",
    "pooled_score",
    "surface_distances",
]

CLASSES = ("liver", "tumour")

EmptyRule = Literal["lits", "exclude"]

_EMPTY_RULES: dict[str, str] = {
    "lits": (
        "LiTS convention: a class absent from the ground truth scores per-case Dice and "
        "Jaccard 1 when nothing of it is predicted, and 0 when anything is (false "
        "positives). Precision and recall of a class absent from both are undefined (NaN) "
        "and left out of means."
    ),
    "exclude": (
        "A class absent from both the ground truth and the prediction is a true-negative "
        "case: its overlap metrics are undefined (NaN) and left out of means."
    ),
}
_EMPTY_COMMON = (
    " Any other 0/0 ratio is 0: a class present in the ground truth but not predicted has "
    "Dice, Jaccard and recall 0; predicted but absent from the ground truth, it has Dice, "
    "Jaccard and precision 0. Surface distances (HD95, ASSD) and the relative volume "
    "difference are undefined when either mask (RVD: the ground truth) is empty, and are "
    "left out of means; Dice already scores those cases."
)


def empty_rule_text(rule: EmptyRule) -> str:
    """The sentence the report prints for the empty-ground-truth rule in force."""
    return f"[{rule}] " + _EMPTY_RULES[rule] + _EMPTY_COMMON


#: The default rule (``[evaluate] empty_rule``), as text.
EMPTY_RULE = empty_rule_text("lits")

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


def _ratio(num: int, den: int, both_empty: bool, empty_value: float = math.nan) -> float:
    if both_empty:
        return empty_value
    return num / den if den else 0.0


def overlap(
    pred: np.ndarray, truth: np.ndarray, empty_rule: EmptyRule = "lits"
) -> dict[str, float]:
    """Dice, Jaccard, precision, recall, accuracy and RVD of two boolean masks.

    When both masks are empty, Dice and Jaccard follow ``empty_rule`` (see
    :func:`empty_rule_text`): 1 for "lits", NaN for "exclude".
    """
    p, t = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    tp = int(np.count_nonzero(p & t))
    fp, fn = int(np.count_nonzero(p)) - tp, int(np.count_nonzero(t)) - tp
    return overlap_from_counts(tp, fp, fn, p.size, empty_rule)


def overlap_from_counts(
    tp: int, fp: int, fn: int, voxels: int, empty_rule: EmptyRule = "lits"
) -> dict[str, float]:
    """:func:`overlap` from voxel counts (``voxels``: the volume's size)."""
    n_p, n_t = tp + fp, tp + fn
    empty = n_p == 0 and n_t == 0
    agreed = 1.0 if empty_rule == "lits" else math.nan
    return {
        "dice": _ratio(2 * tp, n_p + n_t, empty, agreed),
        "jaccard": _ratio(tp, tp + fp + fn, empty, agreed),
        "precision": _ratio(tp, n_p, empty),
        "recall": _ratio(tp, n_t, empty),
        "accuracy": (voxels - fp - fn) / voxels,
        "rvd": (n_p - n_t) / n_t if n_t else math.nan,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "voxels": int(voxels),
    }


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty."""
    return overlap(pred, truth, "exclude")["dice"]


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: the mask minus its 6-connected erosion (MONAI's definition), with
    outside the array as background (``binary_erosion(mask, border_value=0)``).

    The erosion is the AND of the mask shifted by one voxel along each axis, on array
    views: 3-4x faster than ``ndimage.binary_erosion`` on a liver's box, the same voxels.
    """
    mask = np.ascontiguousarray(mask)  # boxes are strided views: shifts need a copy
    core = (slice(1, -1),) * mask.ndim
    interior = mask[core].copy()
    for axis, size in enumerate(mask.shape):
        for start in (0, 2):
            shifted = list(core)
            shifted[axis] = slice(start, start + size - 2)
            interior &= mask[tuple(shifted)]
    inner = np.zeros_like(mask)
    inner[core] = interior
    return mask & ~inner


def surface_distances(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]
) -> dict[str, float]:
    """HD95 and ASSD in mm between the surfaces of two boolean masks.

    ``spacing`` is the voxel size along the arrays' axes, in their order. HD95 is the
    larger of the two directed 95th percentiles; ASSD is the mean of all surface-to-surface
    distances of both directions. NaN when either mask is empty. Each surface voxel's
    distance to the other surface is an exact nearest-neighbour query (a k-d tree of the
    other surface's voxel centres, in mm), so the cost follows the surfaces' size, not
    the volume between them: scattered false positives across a scan cost no more.
    """
    p, t = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if not p.any() or not t.any():
        return {"hd95": math.nan, "assd": math.nan}
    box = bounding_box(p, t)
    assert box is not None
    box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)  # type: ignore[assignment]
    scale = np.asarray([float(s) for s in spacing])
    p_points = np.argwhere(_surface(p[box])) * scale
    t_points = np.argwhere(_surface(t[box])) * scale
    to_t = cKDTree(t_points).query(p_points, workers=-1)[0]
    to_p = cKDTree(p_points).query(t_points, workers=-1)[0]
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
        """Harmonic mean of precision and recall. NaN only when there is nothing to find
        and nothing was predicted; a missed or a spurious lesion set scores 0."""
        if self.true_lesions == 0 and self.predicted == 0:
            return math.nan
        p = self.precision if self.predicted else 0.0
        r = self.recall if self.true_lesions else 0.0
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
    box = bounding_box(pred_tumour, true_tumour)
    if box is None:
        return LesionCounts(0, 0, 0, 0)
    pred_tumour, true_tumour = pred_tumour[box], true_tumour[box]
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
    """Per-class Dice of one case's predicted and true label volumes (NaN when both empty)."""
    p, t = class_masks(pred), class_masks(truth)
    return {name: dice(p[name], t[name]) for name in CLASSES}


def case_counts(pred: np.ndarray, truth: np.ndarray) -> dict[str, tuple[int, int, int]]:
    """Per-class (tp, fp, fn) voxel counts of one case, for pooled (split-level) Dice."""
    return _class_counts(confusion(pred, truth))


def pooled_score(counts: Sequence[dict[str, tuple[int, int, int]]]) -> dict[str, float]:
    """Dice pooled over cases per class, and ``score``: their mean over the classes present
    in the ground truth of any case. One case cannot flip it between NaN and 0: a
    tumour-free case adds its false positives to the tumour pool, no more."""
    pooled: dict[str, float] = {}
    present = []
    for name in CLASSES:
        tp, fp, fn = (sum(c[name][i] for c in counts) for i in range(3))
        pooled[name] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
        if tp + fn > 0:
            present.append(pooled[name])
    pooled["score"] = float(np.mean(present)) if present else math.nan
    return pooled


def confusion(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(3, 3) voxel counts, ``[true label, predicted label]``, of two label volumes."""
    codes = np.asarray(truth, dtype=np.uint8) * np.uint8(3) + np.asarray(pred, dtype=np.uint8)
    # Nine comparisons on uint8 beat bincount, which first widens every voxel to int64.
    counts = [np.count_nonzero(codes == code) for code in range(9)]
    return np.asarray(counts, dtype=np.int64).reshape(3, 3)


def balanced_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean over the label values present in ``truth`` (0, 1, 2) of the fraction of their
    voxels predicted as that value: pixel accuracy that background cannot dominate."""
    return _balanced(confusion(pred, truth))


def _balanced(counts: np.ndarray) -> float:
    rows = counts.sum(axis=1)
    present = rows > 0
    return float(np.mean(np.diag(counts)[present] / rows[present])) if present.any() else math.nan


def _class_counts(counts: np.ndarray) -> dict[str, tuple[int, int, int]]:
    """(tp, fp, fn) of liver (labels 1 and 2) and tumour (label 2) from a confusion matrix."""
    liver = (int(counts[1:, 1:].sum()), int(counts[0, 1:].sum()), int(counts[1:, 0].sum()))
    tumour = (int(counts[2, 2]), int(counts[:2, 2].sum()), int(counts[2, :2].sum()))
    return {"liver": liver, "tumour": tumour}


@dataclass(frozen=True)
class ClassScore:
    """One class of one case: overlap (:func:`overlap_from_counts`), surface distances in
    mm (NaN when either mask is empty) and volumes in mL."""

    dice: float
    jaccard: float
    precision: float
    recall: float
    accuracy: float
    rvd: float
    tp: int
    fp: int
    fn: int
    voxels: int
    hd95: float
    assd: float
    volume_pred_ml: float
    volume_true_ml: float

    @property
    def present(self) -> bool:
        """Whether the class is in the ground truth."""
        return self.tp + self.fn > 0

    @property
    def true_negative(self) -> bool:
        """Absent from the ground truth and from the prediction."""
        return self.tp + self.fp + self.fn == 0


@dataclass(frozen=True)
class CaseMetrics:
    """Every metric of one case (:func:`case_metrics`)."""

    pixel_accuracy: float
    balanced_accuracy: float
    classes: dict[str, ClassScore]
    lesions: LesionCounts

    def to_dict(self) -> dict[str, object]:
        """The layout of a case in metrics.json (NaN kept: the writer makes it null)."""
        return {
            "pixel_accuracy": self.pixel_accuracy,
            "balanced_accuracy": self.balanced_accuracy,
            "classes": {name: asdict(score) for name, score in self.classes.items()},
            "lesions": self.lesions.as_dict(),
        }


def case_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float],
    empty_rule: EmptyRule = "lits",
) -> CaseMetrics:
    """Every metric of one case: per class overlap and distances, lesions, accuracy.

    ``pred`` and ``truth`` are label volumes (0, 1, 2) on the same grid, ``spacing`` its
    voxel size along the arrays' axes in mm; ``empty_rule`` scores classes absent from
    the ground truth (:func:`empty_rule_text`). Everything but the voxel total is
    computed inside the joint foreground's bounding box: outside it both are background.
    """
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {truth.shape} differ in shape")
    box = bounding_box(pred, truth) or (slice(0, 1), slice(0, 1), slice(0, 1))
    voxels = pred.size
    pred, truth = pred[box], truth[box]
    counts = confusion(pred, truth)
    counts[0, 0] += voxels - pred.size  # the background outside the box
    p, t = class_masks(pred), class_masks(truth)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    classes = {
        name: ClassScore(
            **overlap_from_counts(tp, fp, fn, voxels, empty_rule),  # type: ignore[arg-type]
            **surface_distances(p[name], t[name], spacing),  # type: ignore[arg-type]
            volume_pred_ml=(tp + fp) * voxel_ml,
            volume_true_ml=(tp + fn) * voxel_ml,
        )
        for name, (tp, fp, fn) in _class_counts(counts).items()
    }
    return CaseMetrics(
        pixel_accuracy=float(np.trace(counts)) / voxels,
        balanced_accuracy=_balanced(counts),
        classes=classes,
        lesions=lesion_detection(p["tumour"], t["tumour"]),
    )
