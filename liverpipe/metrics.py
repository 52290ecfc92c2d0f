"""Segmentation metrics, per case and per class (liver = labels 1 and 2, tumour = 2).

Empty ground truth rule, applied everywhere: when a class is absent from both the
ground truth and the prediction, its Dice is undefined (NaN) and left out of means;
when it is absent from the ground truth but predicted, Dice is 0.
"""

from __future__ import annotations

import numpy as np

from liverpipe.labels import Label

__all__ = ["EMPTY_RULE", "case_dice", "class_masks", "dice"]

EMPTY_RULE = (
    "A class absent from both ground truth and prediction has undefined Dice (left out of "
    "means); absent from the ground truth but predicted, it scores 0."
)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty."""
    p, t = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    total = int(p.sum()) + int(t.sum())
    if total == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(p, t).sum()) / total


def class_masks(label: np.ndarray) -> dict[str, np.ndarray]:
    """Liver (labels 1 and 2) and tumour (label 2) masks of a label volume."""
    return {"liver": label >= Label.LIVER, "tumour": label == Label.TUMOUR}


def case_dice(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Per-class Dice of one case's predicted and true label volumes."""
    p, t = class_masks(pred), class_masks(truth)
    return {name: dice(p[name], t[name]) for name in p}
