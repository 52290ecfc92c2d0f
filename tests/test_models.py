"""Model factory and metric basics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from liverpipe.evaluate import case_dice, dice
from liverpipe.models import MODELS, ModelWeightsError, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_architecture_builds_and_maps_slices_to_logits(name: str) -> None:
    model = build_model(name, encoder="resnet18", in_channels=3, classes=3).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, 3, 64, 64)


def test_unknown_model_lists_the_choices() -> None:
    with pytest.raises(
        ValueError,
        match="unknown model 'manett'; choose one of: unetplusplus, manet, deeplabv3plus",
    ):
        build_model("manett")


def test_pretrained_weights_offline_is_a_clear_error() -> None:
    with pytest.raises(ModelWeightsError, match=r"no network here.*encoder_weights = none"):
        build_model("manet", encoder="resnet18", encoder_weights="imagenet")


def test_dice_and_the_empty_rule() -> None:
    a = np.zeros((4, 4), bool)
    b = a.copy()
    assert math.isnan(dice(a, b))  # both empty: undefined, left out of means
    b[0, 0] = True
    assert dice(a, b) == 0.0  # predicted where there is none
    a[0, :2] = True
    assert dice(a, b) == pytest.approx(2 / 3)
    truth = np.array([0, 1, 2, 2, 1])
    pred = np.array([0, 1, 1, 2, 0])
    scores = case_dice(pred, truth)
    assert scores["liver"] == pytest.approx(2 * 3 / (3 + 4)) and scores["tumour"] == pytest.approx(
        2 / 3
    )
