"""Slow: the trainer learns. It overfits the real CT, and it generalises to held-out phantoms.

Both run on the CPU in fp32 with small grids; the figures asserted are the issue's bars.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO

from liverpipe.evaluate import dice
from liverpipe.infer import Predictor, predict_path
from liverpipe.models import build_model, load_cascade, load_checkpoint
from liverpipe.preprocess import preprocess_dataset, serial_runner
from liverpipe.settings import Settings, load_settings
from liverpipe.synth.writer import generate_dataset
from liverpipe.train import train, validate
from storage import SliceStore

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")


def _trained(store: Path, run: Path, settings: Settings) -> torch.nn.Module:
    train(store, run, settings)
    cfg = settings.train
    model = build_model(cfg.model, encoder=cfg.encoder, in_channels=cfg.context_slices, classes=3)
    model.load_state_dict(load_checkpoint(run / "last.pt")["model"])
    return model


def test_overfits_the_real_ct(real_ct: tuple[Path, Path], tmp_path: Path) -> None:
    ct, liver = real_ct
    data = tmp_path / "data"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    shutil.copy(ct, data / "imagesTr" / "liver_0.nii.gz")
    shutil.copy(liver, data / "labelsTr" / "liver_0.nii.gz")
    settings = load_settings(
        None,
        {
            "preprocess": {
                "target_spacing": (3.0, 3.0, 3.0),  # the scan's own spacing
                "slice_size": (128, 128),
                "split_fractions": (1.0, 0.0, 0.0),  # the one case trains
            },
            "train": {
                "model": "deeplabv3plus",
                "encoder": "resnet18",
                "steps": 100,
                "batch_size": 4,
                "warmup_steps": 10,
                "val_every": 100,
                "lr": 1e-3,
            },
        },
    )
    summary = preprocess_dataset(data, tmp_path / "store.zarr", settings, serial_runner)
    assert summary.failed == {}
    store = SliceStore.open(tmp_path / "store.zarr")
    model = _trained(tmp_path / "store.zarr", tmp_path / "run", settings)
    scores = validate(model, store, store.cases("train"), settings.train, CPU)
    assert scores["liver_dice"] >= 0.9, scores
    # Predicting the scan writes a mask that overlays it: its grid, and the liver in place.
    predict_path(Predictor([load_cascade(tmp_path / "run")]), ct, tmp_path / "mask.nii.gz")
    mask, scan, truth = (nib.load(p) for p in (tmp_path / "mask.nii.gz", ct, liver))
    assert mask.shape == scan.shape and np.array_equal(mask.affine, scan.affine)
    native = dice(np.asarray(mask.dataobj) > 0, np.asarray(truth.dataobj) > 0)
    assert native >= 0.9, native


def test_learns_liver_on_held_out_phantoms(tmp_path: Path) -> None:
    generate_dataset(tmp_path / "data", 16, seed=1, size="small", workers=2)
    settings = load_settings(
        REPO / "configs" / "tiny.toml",
        {
            "preprocess": {"split_fractions": (0.7, 0.0, 0.3)},
            "train": {
                "model": "manet",
                "steps": 200,
                "batch_size": 8,
                "warmup_steps": 10,
                "val_every": 200,
                "log_every": 50,
            },
        },
    )
    preprocess_dataset(tmp_path / "data", tmp_path / "store.zarr", settings, serial_runner)
    store = SliceStore.open(tmp_path / "store.zarr")
    test_ids = store.cases("test")
    assert len(test_ids) >= 2 and not set(test_ids) & set(store.cases("train"))
    model = _trained(tmp_path / "store.zarr", tmp_path / "run", settings)
    scores = validate(model, store, test_ids, settings.train, CPU)
    assert scores["liver_dice"] >= 0.9, scores


def test_gpu_check_dry_run_reports_every_model(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": str(REPO / ".venv" / "bin" / "python")}
    if not Path(env["PYTHON"]).exists():
        env.pop("PYTHON")
    result = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = {r["model"]: r for r in record["results"]}
    assert set(rows) == {"unetplusplus", "manet", "deeplabv3plus"}
    for row in rows.values():
        assert row["images_per_s"] > 0 and 0 <= row["data_wait"] <= 1
        assert np.isfinite(row["real_over_fixed"]) and row["real_over_fixed"] > 0
    assert "| model | images/s |" in result.stdout
