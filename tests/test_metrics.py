"""Metrics: the empty-ground-truth rule, lesion detection, and agreement with MONAI."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from liverpipe.evaluate import (
    LesionCounts,
    case_counts,
    case_metrics,
    lesion_detection,
    overlap,
    pooled_score,
    surface_distances,
)


def _blob(shape: tuple[int, int, int], seed: int, level: float = 0.6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=3)
    return field > level * field.std()


def _monai(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> dict[str, float]:
    from monai.metrics import (
        compute_average_surface_distance,
        compute_dice,
        compute_hausdorff_distance,
    )

    p = torch.from_numpy(pred[None, None].astype(np.float32))
    t = torch.from_numpy(truth[None, None].astype(np.float32))
    return {
        "dice": float(compute_dice(p, t, include_background=True)),
        "hd95": float(
            compute_hausdorff_distance(
                p, t, include_background=True, percentile=95, spacing=spacing
            )
        ),
        "assd": float(
            compute_average_surface_distance(
                p, t, include_background=True, symmetric=True, spacing=spacing
            )
        ),
    }


@pytest.mark.parametrize(
    ("seed", "spacing"),
    [(0, (1.0, 1.0, 1.0)), (1, (2.5, 0.7, 0.7)), (2, (5.0, 0.8, 1.3)), (3, (1.0, 3.0, 0.5))],
)
def test_dice_and_distances_agree_with_monai(seed: int, spacing: tuple[float, ...]) -> None:
    pred, truth = _blob((24, 40, 36), seed), _blob((24, 40, 36), seed + 100)
    ours = overlap(pred, truth) | surface_distances(pred, truth, spacing)
    theirs = _monai(pred, truth, spacing)
    assert ours["dice"] == pytest.approx(theirs["dice"], abs=1e-6)
    assert abs(ours["hd95"] - theirs["hd95"]) <= max(spacing)
    assert abs(ours["assd"] - theirs["assd"]) <= max(spacing)


def test_single_voxels_give_their_exact_distance() -> None:
    pred, truth = np.zeros((9, 9, 9), bool), np.zeros((9, 9, 9), bool)
    pred[2, 3, 4], truth[6, 3, 1] = True, True
    spacing = (2.0, 0.5, 0.8)
    expected = math.hypot(4 * 2.0, 3 * 0.8)
    ours = surface_distances(pred, truth, spacing)
    assert ours["hd95"] == pytest.approx(expected) and ours["assd"] == pytest.approx(expected)
    theirs = _monai(pred, truth, spacing)
    assert theirs["hd95"] == pytest.approx(expected) and theirs["assd"] == pytest.approx(expected)
    assert overlap(pred, truth)["dice"] == 0.0


def test_identical_masks_score_perfectly() -> None:
    mask = _blob((20, 30, 30), 5)
    row = overlap(mask, mask) | surface_distances(mask, mask, (3.0, 1.0, 1.0))
    assert row["dice"] == row["jaccard"] == row["precision"] == row["recall"] == 1.0
    assert row["hd95"] == 0.0 and row["assd"] == 0.0 and row["rvd"] == 0.0


def test_empty_ground_truth_rule() -> None:
    empty, some = np.zeros((5, 6, 7), bool), np.zeros((5, 6, 7), bool)
    some[1:3, 2:4, 2:5] = True
    both = overlap(empty, empty, "exclude") | surface_distances(empty, empty, (1, 1, 1))
    assert all(math.isnan(both[k]) for k in ("dice", "jaccard", "precision", "recall", "hd95"))
    assert both["accuracy"] == 1.0
    # The LiTS convention (the default): nothing to find and nothing found scores 1.
    lits = overlap(empty, empty)
    assert lits["dice"] == lits["jaccard"] == 1.0
    assert math.isnan(lits["precision"]) and math.isnan(lits["recall"])
    assert overlap(some, empty)["dice"] == 0.0  # false positives on a tumour-free case
    false_positive = overlap(some, empty) | surface_distances(some, empty, (1, 1, 1))
    assert false_positive["dice"] == false_positive["precision"] == 0.0
    assert math.isnan(false_positive["rvd"]) and math.isnan(false_positive["hd95"])
    missed = overlap(empty, some)
    assert missed["dice"] == missed["recall"] == missed["jaccard"] == 0.0
    assert missed["rvd"] == -1.0


def test_overlap_counts_match_their_definitions() -> None:
    pred, truth = _blob((16, 20, 20), 7), _blob((16, 20, 20), 8)
    row = overlap(pred, truth)
    tp, fp, fn = (pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()
    assert (row["tp"], row["fp"], row["fn"]) == (tp, fp, fn)
    assert row["jaccard"] == pytest.approx(tp / (tp + fp + fn))
    assert row["precision"] == pytest.approx(tp / (tp + fp))
    assert row["recall"] == pytest.approx(tp / (tp + fn))
    assert row["accuracy"] == pytest.approx(1 - (fp + fn) / pred.size)
    assert row["rvd"] == pytest.approx((pred.sum() - truth.sum()) / truth.sum())


def test_lesion_detection_counts() -> None:
    truth, pred = np.zeros((20, 40, 40), bool), np.zeros((20, 40, 40), bool)
    truth[2:6, 2:8, 2:8] = True  # A: found well
    pred[2:6, 3:8, 2:8] = True
    truth[10:14, 20:30, 20:30] = True  # B: grazed by one voxel only, so missed
    pred[13, 29, 29] = True
    truth[15:18, 2:5, 30:33] = True  # C: not predicted at all
    pred[15:18, 30:36, 2:6] = True  # a false positive far from any lesion
    counts = lesion_detection(pred, truth)
    assert (counts.true_lesions, counts.detected) == (3, 1)
    assert (counts.predicted, counts.true_positive) == (3, 1)
    assert counts.recall == pytest.approx(1 / 3) and counts.precision == pytest.approx(1 / 3)
    assert counts.f1 == pytest.approx(1 / 3)
    assert (counts + counts).true_lesions == 6


def test_lesion_split_by_prediction_still_counts_as_detected() -> None:
    truth, pred = np.zeros((8, 30, 30), bool), np.zeros((8, 30, 30), bool)
    truth[2:6, 5:25, 5:15] = True
    pred[2:6, 5:14, 5:15] = True  # two predicted pieces of one lesion
    pred[2:6, 16:25, 5:15] = True
    counts = lesion_detection(pred, truth)
    assert (counts.true_lesions, counts.detected, counts.predicted, counts.true_positive) == (
        1,
        1,
        2,
        2,
    )


def test_case_metrics_reports_both_classes_and_volumes() -> None:
    truth = np.zeros((10, 20, 20), np.uint8)
    truth[2:8, 4:16, 4:16] = 1
    truth[4:6, 8:11, 8:11] = 2
    pred = truth.copy()
    pred[4:6, 8:11, 8:11] = 1  # the tumour is missed, the liver (1 or 2) is perfect
    result = case_metrics(pred, truth, (2.0, 1.0, 1.0))
    liver, tumour = result.classes["liver"], result.classes["tumour"]
    assert liver.dice == 1.0 and tumour.dice == 0.0
    assert liver.volume_true_ml == pytest.approx(6 * 12 * 12 * 2.0 / 1000)
    assert tumour.volume_pred_ml == 0.0
    assert result.pixel_accuracy == pytest.approx(1 - 18 / truth.size)
    assert result.lesions.true_lesions == 1 and result.lesions.detected == 0
    # metrics.json's layout of a case is unchanged by the typed record
    as_json = result.to_dict()
    assert list(as_json) == ["pixel_accuracy", "balanced_accuracy", "classes", "lesions"]
    assert list(as_json["classes"]["liver"]) == [
        "dice", "jaccard", "precision", "recall", "accuracy", "rvd", "tp", "fp", "fn",
        "voxels", "hd95", "assd", "volume_pred_ml", "volume_true_ml",
    ]  # fmt: skip
    assert as_json["lesions"]["f1"] == 0.0 and as_json["classes"]["tumour"]["dice"] == 0.0


def test_lesion_f1_is_zero_when_lesions_are_missed_or_invented() -> None:
    assert LesionCounts(3, 0, 0, 0).f1 == 0.0  # lesions exist, none predicted
    assert LesionCounts(0, 0, 2, 0).f1 == 0.0  # none exist, two predicted
    assert math.isnan(LesionCounts(0, 0, 0, 0).f1)  # nothing to find, nothing found
    assert LesionCounts(2, 1, 1, 1).f1 == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    truth = np.zeros((8, 8, 8), bool)
    truth[2:5, 2:5, 2:5] = True
    assert lesion_detection(np.zeros((8, 8, 8), bool), truth).f1 == 0.0


def test_case_metrics_follow_the_chosen_empty_rule() -> None:
    truth = np.zeros((10, 12, 12), np.uint8)
    truth[2:8, 2:10, 2:10] = 1  # liver, no tumour
    lits = case_metrics(truth, truth, (1, 1, 1))
    exclude = case_metrics(truth, truth, (1, 1, 1), "exclude")
    assert lits.classes["tumour"].dice == 1.0
    assert math.isnan(exclude.classes["tumour"].dice)
    spurious = truth.copy()
    spurious[5, 5, 5] = 2
    assert case_metrics(spurious, truth, (1, 1, 1)).classes["tumour"].dice == 0.0


def test_balanced_accuracy_is_not_fooled_by_background(real_ct: tuple[Path, Path]) -> None:
    """On the real CT, predicting background everywhere is 0.90 accurate but 0.5 balanced."""
    truth = np.asarray(nib.load(real_ct[1]).dataobj).astype(np.uint8)
    nothing = np.zeros_like(truth)
    row = case_metrics(nothing, truth, (3.0, 3.0, 3.0))
    assert row.pixel_accuracy == pytest.approx(0.90, abs=0.01)
    assert row.balanced_accuracy == pytest.approx(0.5)
    assert case_metrics(truth, truth, (3.0, 3.0, 3.0)).balanced_accuracy == 1.0


def test_pooled_validation_score_does_not_halve_for_one_false_positive_voxel() -> None:
    """Two val cases, one tumour-free: a single spurious tumour voxel on it barely moves the
    pooled score, where the old per-case mean fell from about 0.9 to about 0.45."""
    with_tumour = np.zeros((10, 20, 20), np.uint8)
    with_tumour[2:8, 4:16, 4:16] = 1
    with_tumour[4:6, 8:12, 8:12] = 2
    free = np.zeros((10, 20, 20), np.uint8)
    free[2:8, 4:16, 4:16] = 1
    spurious = free.copy()
    spurious[5, 10, 10] = 2
    clean = pooled_score([case_counts(with_tumour, with_tumour), case_counts(free, free)])
    noisy = pooled_score([case_counts(with_tumour, with_tumour), case_counts(spurious, free)])
    assert clean["score"] == 1.0
    assert noisy["score"] > 0.98 and noisy["tumour"] > 0.97
    # Tumour absent from every case: the score is liver alone, never NaN.
    only_free = pooled_score([case_counts(spurious, free)])
    assert only_free["score"] == pytest.approx(only_free["liver"]) and not math.isnan(
        only_free["score"]
    )


def test_surface_and_confusion_match_their_reference_definitions() -> None:
    """The fast surface is the mask minus its 6-connected erosion with a background
    border, voxel for voxel; the confusion counts are bincount's, on any shape."""
    from liverpipe.evaluate.metrics import _surface, confusion

    rng = np.random.default_rng(5)
    for shape in [(9, 11, 13), (1, 7, 7), (2, 5, 3), (6, 6), (20, 30, 25)]:
        mask = ndimage.binary_dilation(rng.random(shape) > 0.9, iterations=1)
        mask[(0,) * len(shape)] = True  # touching the array's border
        expected = mask & ~ndimage.binary_erosion(mask, border_value=0)
        assert np.array_equal(_surface(mask), expected), shape
        pred = rng.integers(0, 3, shape).astype(np.uint8)
        truth = rng.integers(0, 3, shape).astype(np.uint8)
        codes = truth.astype(np.int64) * 3 + pred
        reference = np.bincount(codes.ravel(), minlength=9).reshape(3, 3)
        assert np.array_equal(confusion(pred, truth), reference), shape
    assert np.array_equal(_surface(np.ones((4, 4, 4), bool))[1:3, 1:3, 1:3], np.zeros((2, 2, 2)))
