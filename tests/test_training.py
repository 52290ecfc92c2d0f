"""Trainer on a tiny phantom store (CPU, fp32): sampling, augmentation, learning, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

from liverpipe.models import CheckpointMismatchError, load_checkpoint
from liverpipe.settings import AugmentConfig, load_settings
from liverpipe.train import (
    ResidentSource,
    SliceSampler,
    SliceTable,
    StreamingSource,
    augment_batch,
    train,
)
from storage import SliceStore

TINY = REPO / "configs" / "tiny.toml"
CPU = torch.device("cpu")


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def test_sampler_oversamples_foreground(tiny_store: Path) -> None:
    store = SliceStore.open(tiny_store)
    table = SliceTable.from_store(store, store.cases("train"))
    sampler = SliceSampler(table, (1 / 3, 1 / 3), seed=0)
    rows = np.concatenate([sampler.draw(12) for _ in range(1000)])
    # The mixture: a third from tumour slices, a third from liver slices, a third uniform.
    p_liver, p_tumour = table.liver.mean(), table.tumour.mean()
    tumour_given_liver = table.tumour[table.liver].mean()
    expected_tumour = (
        (1 / 3 if table.tumour.any() else p_tumour / 3) + tumour_given_liver / 3 + p_tumour / 3
    )
    expected_liver = (1 / 3 if table.tumour.any() else p_liver / 3) + 1 / 3 + p_liver / 3
    assert abs(table.tumour[rows].mean() - expected_tumour) < 0.02
    assert abs(table.liver[rows].mean() - expected_liver) < 0.02
    assert table.tumour[rows].mean() > 2 * p_tumour or not table.tumour.any()
    assert set(np.unique(table.case[rows])) == set(range(len(table.case_ids)))


@pytest.mark.parametrize("cache_bytes", [0, 2**24])
def test_resident_and_streaming_sources_give_the_same_batches(
    tiny_store: Path, cache_bytes: int
) -> None:
    store = SliceStore.open(tiny_store)
    table = SliceTable.from_store(store, store.cases("train"))
    sampler = SliceSampler(table, (1 / 3, 1 / 3), seed=3)
    resident = ResidentSource(store, table, 3, torch.device("cpu"))
    streaming = StreamingSource(store, table, 3, threads=3, prefetch=2, cache_bytes=cache_bytes)
    try:
        for _ in range(3):  # later batches come partly from the chunk cache
            rows = sampler.draw(16)
            streaming.submit(rows)
            stream_images, stream_labels = streaming.next()
            images, labels = resident.batch(rows)
            assert images.shape == (16, 3, 64, 64) and labels.shape == (16, 64, 64)
            torch.testing.assert_close(images, stream_images)
            assert torch.equal(labels, stream_labels)
    finally:
        streaming.close()
    assert (streaming.reader.cache.hits > 0) == (cache_bytes > 0)


def test_augmentation_is_deterministic_and_keeps_image_and_label_aligned() -> None:
    labels = torch.zeros(4, 64, 64, dtype=torch.long)
    labels[:, 16:48, 20:44] = 1
    labels[:, 28:36, 28:36] = 2
    images = labels[:, None].float().repeat(1, 3, 1, 1) / 2
    cfg = AugmentConfig(
        intensity_scale=0, intensity_shift=0, gamma=(1.0, 1.0), noise_std=0, elastic=True
    )
    a = augment_batch(images, labels, cfg, torch.Generator().manual_seed(7))
    b = augment_batch(images, labels, cfg, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], labels)  # it did transform
    assert set(a[1].unique().tolist()) <= {0, 1, 2}
    agree = (torch.round(a[0][:, 1] * 2).long() == a[1]).float().mean()
    assert agree > 0.97  # the same spatial transform moved image and label
    off = AugmentConfig(
        rotate_deg=0,
        scale=(1.0, 1.0),
        intensity_scale=0,
        intensity_shift=0,
        gamma=(1.0, 1.0),
        noise_std=0,
        flip_axes=(),
    )
    same = augment_batch(images, labels, off, torch.Generator().manual_seed(0))
    assert torch.equal(same[0], images) and torch.equal(same[1], labels)


def test_tumour_stage_augmentation_keeps_the_liver_anchor(tmp_path: Path) -> None:
    """Stage 2's input is HU relative to the liver's median: its intensity augmentation
    scales around 0 and never shifts it, even when a config sets other augment keys."""
    from liverpipe.settings import TumourAugmentConfig, load_settings

    config = tmp_path / "c.toml"
    config.write_text("[tumour.augment]\nnoise_std = 0.0\nrotate_deg = 0.0\n")
    settings = load_settings(config)
    cfg = settings.tumour.augment
    assert isinstance(cfg, TumourAugmentConfig) and cfg.noise_std == 0
    assert cfg.intensity_shift == 0 and cfg.gamma == (1.0, 1.0)  # defaults survive the file
    assert settings.train.augment.intensity_shift > 0  # the liver stage keeps its shift
    images = torch.linspace(-1.5, 1.5, 64 * 64).reshape(1, 1, 64, 64).repeat(8, 3, 1, 1)
    images[:, :, 20:40, 20:40] = 0.0  # liver-like: exactly the median
    labels = torch.zeros(8, 64, 64, dtype=torch.long)
    out, _ = augment_batch(
        images,
        labels,
        cfg.model_copy(update={"scale": (1.0, 1.0), "flip_axes": ()}),
        torch.Generator().manual_seed(0),
    )
    assert torch.equal(out[:, :, 20:40, 20:40], images[:, :, 20:40, 20:40])  # 0 stays 0
    ratio = out[images != 0] / images[images != 0]
    assert not torch.allclose(ratio, torch.ones_like(ratio))  # it did scale
    assert float(ratio.min()) >= 0.9 - 1e-6 and float(ratio.max()) <= 1.1 + 1e-6


def test_flips_mirror_image_and_label_together_on_the_configured_axes() -> None:
    """Left-right and front-back mirroring, each in about half the batch, on by default."""
    n = 400
    labels = torch.zeros(n, 16, 16, dtype=torch.long)
    labels[:, 2:6, 1:4] = 1  # off-centre in both axes, so every flip is visible
    images = labels[:, None].float().repeat(1, 3, 1, 1)
    assert AugmentConfig().flip_axes == ("lr", "ap")
    only_flips = AugmentConfig(
        rotate_deg=0,
        scale=(1.0, 1.0),
        intensity_scale=0,
        intensity_shift=0,
        gamma=(1.0, 1.0),
        noise_std=0,
    )
    out_images, out_labels = augment_batch(
        images, labels, only_flips, torch.Generator().manual_seed(3)
    )
    assert torch.equal(out_images[:, 0].long(), out_labels)  # image and label move together
    seen = {}
    for name, flipped in {
        "none": labels,
        "lr": labels.flip(2),
        "ap": labels.flip(1),
        "both": labels.flip(1).flip(2),
    }.items():
        seen[name] = int((out_labels == flipped).all(dim=(1, 2)).sum())
    assert sum(seen.values()) == n
    assert all(60 < count < 140 for count in seen.values()), seen  # about n / 4 each
    lr_only = only_flips.model_copy(update={"flip_axes": ("lr",)})
    _, lr_labels = augment_batch(images, labels, lr_only, torch.Generator().manual_seed(3))
    assert not (lr_labels == labels.flip(1)).all(dim=(1, 2)).any()  # never front-back


def test_without_val_cases_last_checkpoint_is_the_model(tiny_store: Path, tmp_path: Path) -> None:
    """No val case: nothing can choose best.pt; the run says so and keeps last.pt."""
    from liverpipe.preprocess import preprocess_dataset, serial_runner

    settings = load_settings(
        TINY,
        {"preprocess": {"split_fractions": (1.0, 0.0, 0.0)}, "train": {"steps": 4, "val_every": 2}},
    )
    store = tmp_path / "train_only.zarr"
    source = Path(
        SliceStore.open(tiny_store).case(SliceStore.open(tiny_store).cases()[0]).meta.source_image
    ).parents[1]
    preprocess_dataset(source, store, settings, serial_runner)
    assert SliceStore.open(store).cases("val") == []
    result = train(store, tmp_path / "run", settings)
    assert not (tmp_path / "run" / "best.pt").exists() and (tmp_path / "run" / "last.pt").exists()
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["checkpoint"] == "last.pt" and "no val cases" in record["selection"]
    assert math.isnan(result.best_score)


def test_validation_score_is_pooled_over_the_val_cases(tiny_store: Path) -> None:
    from liverpipe.evaluate import case_counts, pooled_score
    from liverpipe.infer import predict_probabilities
    from liverpipe.models import build_model
    from liverpipe.train import validate

    store = SliceStore.open(tiny_store)
    model = build_model("deeplabv3plus", encoder="resnet18", in_channels=3, classes=3)
    ids = store.cases()
    cfg = load_settings(TINY).train
    scores = validate(model, store, ids, cfg, torch.device("cpu"))
    counts = []
    for case_id in ids:
        image, label = store.case(case_id).load()
        t = store.case(case_id).meta.intensity
        probs = predict_probabilities(
            [model], image.astype(np.float32) * t.stored_scale + t.stored_offset, 3, CPU
        )
        counts.append(case_counts(probs.argmax(0).astype(np.uint8), label))
    expected = pooled_score(counts)
    assert scores["score"] == expected["score"] and scores["tumour_dice"] == expected["tumour"]
    assert set(scores["cases"]) == set(ids)


@pytest.mark.parametrize("model", ["unetplusplus", "manet", "deeplabv3plus"])
def test_each_model_learns_on_the_tiny_store(tiny_store: Path, tmp_path: Path, model: str) -> None:
    settings = load_settings(
        TINY, {"train": {"model": model, "steps": 30, "log_every": 1, "val_every": 30}}
    )
    result = train(tiny_store, tmp_path / model, settings)
    losses = [h["loss"] for h in _history(tmp_path / model) if "loss" in h]
    assert len(losses) == 30 and result.steps == 30
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert {p.name for p in (tmp_path / model).iterdir()} >= {
        "last.pt",
        "best.pt",
        "config.json",
        "history.jsonl",
    }
    state = load_checkpoint(tmp_path / model / "best.pt")
    assert state["identity"]["train"]["model"] == model
    # best.pt predicts: weights only. last.pt resumes: optimiser, scheduler and RNG too.
    assert set(state) == {"model", "step", "best", "identity"}
    assert {"optimiser", "scheduler", "rng"} <= set(load_checkpoint(tmp_path / model / "last.pt"))


@pytest.mark.parametrize("resident", ["never", "always"])
def test_resume_continues_exactly(tiny_store: Path, tmp_path: Path, resident: str) -> None:
    common = {"steps": 12, "log_every": 1, "val_every": 6, "resident": resident, "prefetch": 3}
    full = load_settings(TINY, {"train": common})
    train(tiny_store, tmp_path / "full", full)

    def crash_after_checkpoint(step: int, _loss: float) -> None:
        if step == 8:  # the checkpoint of step 6 exists; steps 7 and 8 are lost
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_store, tmp_path / "resumed", full, on_step=crash_after_checkpoint)
    train(tiny_store, tmp_path / "resumed", full, resume=True)
    a = [h for h in _history(tmp_path / "full") if "loss" in h]
    b = [h for h in _history(tmp_path / "resumed") if "loss" in h]
    assert [h["step"] for h in b] == list(range(1, 13))
    np.testing.assert_allclose([h["loss"] for h in b], [h["loss"] for h in a], rtol=1e-5)
    np.testing.assert_allclose([h["lr"] for h in b], [h["lr"] for h in a])


def test_resume_refuses_a_checkpoint_of_another_config(tiny_store: Path, tmp_path: Path) -> None:
    train(tiny_store, tmp_path / "r", load_settings(TINY, {"train": {"steps": 2, "val_every": 2}}))
    other = load_settings(TINY, {"train": {"steps": 4, "encoder": "resnet34"}})
    with pytest.raises(CheckpointMismatchError, match="different configuration \\(encoder\\)"):
        train(tiny_store, tmp_path / "r", other, resume=True)


def test_two_process_gloo_ddp(tiny_store: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "liverpipe.train",
        "--store",
        str(tiny_store),
        "--out",
        str(tmp_path / "ddp"),
        "--config",
        str(TINY),
        "--steps",
        "6",
        "--model",
        "manet",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert config["world_size"] == 2
    history = [h for h in _history(tmp_path / "ddp") if "loss" in h]
    assert [h["step"] for h in history] == [5, 6]  # rank 0 alone writes, once per step
    state = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert state["step"] == 6 and len(state["rng"]) == 2  # both ranks' RNG states, for resume
    assert not torch.equal(state["rng"][0]["augment"], state["rng"][1]["augment"])


def test_train_all_cli_trains_the_three_models(tiny_store: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from liverpipe.cli import app

    result = CliRunner().invoke(
        app,
        [
            "train-all",
            "--store",
            str(tiny_store),
            "--out",
            str(tmp_path),
            "--steps",
            "2",
            "--config",
            str(TINY),
        ],
    )
    assert result.exit_code == 0, result.output
    (run,) = [p for p in tmp_path.iterdir() if (p / "run.json").is_file()]
    for name in ("unetplusplus", "manet", "deeplabv3plus"):
        for stage in ("liver", "tumour"):
            assert (run / name / stage / "last.pt").is_file()
            assert f"{name} {stage}: 2 steps" in result.stdout
            record = json.loads((run / name / stage / "config.json").read_text())
            assert record["stage"] == stage
            state = load_checkpoint(run / name / stage / "last.pt")
            assert state["identity"]["train"]["stage"] == stage
    # The first run becomes the champion of every model and of the ensemble.
    registry = json.loads((tmp_path / "registry.json").read_text())
    assert set(registry["champions"].values()) == {run.name}
    assert len(registry["champions"]) == 4


def test_train_cli_reports_and_writes_the_run(tiny_store: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from liverpipe.cli import app

    args = [
        "train",
        "--store",
        str(tiny_store),
        "--model",
        "deeplabv3plus",
        "--out",
        str(tmp_path / "r"),
        "--steps",
        "2",
        "--config",
        str(TINY),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "trained deeplabv3plus (liver) for 2 steps" in result.stdout
    resumed = CliRunner().invoke(
        app, [*args[:-4], "--steps", "3", "--config", str(TINY), "--resume"]
    )
    assert resumed.exit_code == 0, resumed.output
    assert [h["step"] for h in _history(tmp_path / "r") if "loss" in h] == [2, 3]


def test_train_all_runs_one_process_per_gpu_and_isolates_a_failure(
    tiny_store: Path, tmp_path: Path
) -> None:
    from liverpipe.settings import load_settings
    from liverpipe.train import train_all

    settings = load_settings(TINY, {"train": {"steps": 2}, "tumour": {"steps": 2}})
    (tmp_path / "manet" / "tumour").mkdir(parents=True)
    broken = tmp_path / "manet" / "tumour" / "last.pt"
    broken.write_bytes(b"not a checkpoint")  # manet's tumour-stage resume fails
    # Two "GPUs": on this CPU machine the children fall back to the CPU, but the launcher
    # still runs one process per device, two at a time.
    outcomes = train_all(tiny_store, tmp_path, settings, resume=True, gpus=["0", "1"])
    by_job = {o.job: o for o in outcomes}
    assert [o.job for o in outcomes] == [
        f"{m} {s}" for m in ("unetplusplus", "manet", "deeplabv3plus") for s in ("liver", "tumour")
    ]
    failed = by_job["manet tumour"]
    log = tmp_path / "manet" / "tumour" / "train.log"
    assert failed.result is None and str(log) in (failed.error or "")
    for job, outcome in by_job.items():
        if job == "manet tumour":
            continue
        assert outcome.result is not None and outcome.result.steps == 2
        recorded = json.loads((outcome.run_dir / "config.json").read_text())
        section = "train" if outcome.stage == "liver" else "tumour"
        assert recorded[section]["model"] == outcome.model and recorded["stage"] == outcome.stage
    assert {o.device for o in outcomes} == {"GPU 0", "GPU 1"}


def test_liver_stage_reads_slices_averaged_down_and_upsamples_back() -> None:
    """Pooling pads to the stride, averages blocks; labels take each block's majority; the
    softmax comes back to the full size, constant where the input was."""
    from liverpipe.infer import pool, pool_labels, unpool

    images = torch.zeros(2, 3, 96, 160)
    images[:, :, :48] = 1.0
    pooled = pool(images, 3)
    assert pooled.shape == (2, 3, 96 // 3, (160 + 32) // 3)  # x padded to 192 = 2 * 96
    assert torch.allclose(pooled[:, :, :16, :53], torch.ones(1))  # 160 / 3: real columns
    assert torch.allclose(pooled[:, :, :, 54:], torch.zeros(1))  # padding: the image's minimum
    labels = torch.zeros(1, 6, 6, dtype=torch.long)
    labels[0, :3, :2] = 2  # 6 of the top-left block's 9 voxels
    assert pool_labels(labels, 3).tolist() == [[[2, 0], [0, 0]]]
    probs = torch.softmax(torch.randn(2, 3, 32, 64), 1)
    back = unpool(probs, 3, (96, 160))
    assert back.shape == (2, 3, 96, 160)
    assert torch.allclose(back.sum(1), torch.ones(1), atol=1e-5)


def test_epochs_set_the_training_length() -> None:
    from liverpipe.train import resolve_steps

    cfg = load_settings(TINY, {"train": {"epochs": 2.5, "batch_size": 8}}).train
    assert resolve_steps(cfg, 100, world=1) == 32  # ceil(2.5 * 100 / 8)
    assert resolve_steps(cfg, 100, world=2) == 16
    assert resolve_steps(cfg.model_copy(update={"epochs": None}), 100, 1) == cfg.steps


def test_tumour_stage_trains_on_liver_roi_crops(tiny_store: Path, tmp_path: Path) -> None:
    """The tumour stage's batches are crops of the configured size inside the liver ROI,
    liver-relative (the liver's median near 0); half centred on tumour when there is any."""
    from liverpipe.train import RoiSource, SliceSampler, stage_table

    store = SliceStore.open(tiny_store)
    cfg = load_settings(TINY).tumour
    table, prepared = stage_table(store, store.cases("train"), cfg, CPU)
    assert table.liver.all()  # every row is a slice of some liver's ROI
    sampler = SliceSampler(table, cfg.oversample, 0)
    source = RoiSource(store, table, cfg, CPU, sampler.rng, prepared)
    images, labels = source.batch(sampler.draw(32))
    assert images.shape == (32, cfg.context_slices, *cfg.crop_size)
    assert labels.shape == (32, *cfg.crop_size)
    liver = images[:, cfg.context_slices // 2][labels == 1]
    assert abs(float(liver.median())) < 0.2  # relative to the liver's median
    if table.tumour.any():
        assert (labels == 2).flatten(1).any(1).float().mean() >= 0.3
    result = train(tiny_store, tmp_path / "tumour", load_settings(TINY), stage="tumour")
    record = json.loads((tmp_path / "tumour" / "config.json").read_text())
    assert record["stage"] == "tumour" and result.steps == load_settings(TINY).tumour.steps


def test_job_slots_split_the_cores_and_leave_one_gpu_here(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from liverpipe.train import launch

    monkeypatch.setattr(launch, "available_cpus", lambda: 12)
    assert [s.name for s in launch.job_slots(["0", "1"], None, 6)] == ["GPU 0", "GPU 1"]
    assert launch.job_slots(["0"], None, 6) == []  # one GPU: one job after another here
    assert launch.job_slots([], 1, 6) == []  # one CPU job at a time: here, with a bar
    slots = launch.job_slots([], None, 6)  # default: one per core, at most the jobs
    assert len(slots) == 6 and slots[0].env["OMP_NUM_THREADS"] == "2"
    assert slots[0].env["CUDA_VISIBLE_DEVICES"] == ""
    three = launch.job_slots([], 3, 6)
    assert [s.name for s in three] == [f"CPU slot {i} (4 threads)" for i in range(3)]
    assert len(launch.job_slots([], 8, 2)) == 2  # never more slots than jobs


def test_job_cost_starts_the_longest_jobs_first() -> None:
    from liverpipe.settings import load_settings
    from liverpipe.train import job_cost

    cpu = load_settings(REPO / "configs" / "cpu.toml")
    # The demo's tumour stage: 1500 steps of 64^2 crops; its liver stage: 400 of 192^2 / 3^2;
    # a UNet++ step costs twice a DeepLabV3Plus step.
    assert cpu.tumour.model == "unetplusplus"
    assert job_cost(cpu, "tumour") == 1500 * 16 * 64 * 64 * 2.0
    assert job_cost(cpu, "liver") == 400 * 16 * 64 * 64 * 2.0
    assert job_cost(cpu, "tumour") > job_cost(cpu, "liver")
    dlv3 = cpu.model_copy(
        update={"tumour": cpu.tumour.model_copy(update={"model": "deeplabv3plus"})}
    )
    assert job_cost(dlv3, "tumour") == 1500 * 16 * 64 * 64


def test_train_all_on_the_cpu_runs_jobs_side_by_side_with_a_share_of_the_cores(
    tiny_store: Path, tmp_path: Path
) -> None:
    from liverpipe._system import available_cpus
    from liverpipe.settings import load_settings
    from liverpipe.train import train_all

    settings = load_settings(TINY, {"train": {"steps": 2}, "tumour": {"steps": 2}})
    outcomes = train_all(
        tiny_store, tmp_path, settings, gpus=[], cpu_jobs=2, models=("deeplabv3plus", "manet")
    )
    assert [o.job for o in outcomes] == [
        "deeplabv3plus liver",
        "deeplabv3plus tumour",
        "manet liver",
        "manet tumour",
    ]
    threads = max(1, available_cpus() // 2)
    unit = "thread" if threads == 1 else "threads"
    assert {o.device for o in outcomes} <= {f"CPU slot {i} ({threads} {unit})" for i in (0, 1)}
    for outcome in outcomes:
        assert outcome.result is not None and outcome.result.steps == 2, outcome.error
        recorded = json.loads((outcome.run_dir / "config.json").read_text())
        assert recorded["torch_threads"] == threads  # the child took its share, not all
        section = "train" if outcome.stage == "liver" else "tumour"
        assert recorded[section]["resident_budget_gb"] == settings.train.resident_budget_gb / 2
        assert recorded["stage"] == outcome.stage
        assert (outcome.run_dir / "train.log").is_file()  # a child process trained it


def test_a_store_without_train_cases_is_refused_once_before_any_job(
    phantom_dir: Path, tmp_path: Path
) -> None:
    """train-all checks the store before it makes a run folder and starts six jobs that
    would each fail with the same error; a lone new case is a train case."""
    from liverpipe.errors import LiverpipeError
    from liverpipe.preprocess import preprocess_dataset, serial_runner
    from liverpipe.train import start_run

    one = tmp_path / "one"
    for folder in ("imagesTr", "labelsTr"):
        (one / folder).mkdir(parents=True)
        first = sorted((phantom_dir / folder).iterdir())[0]
        (one / folder / first.name).symlink_to(first)
    tiny = REPO / "configs" / "tiny.toml"
    for fractions, store in (((0.7, 0.15, 0.15), "a.zarr"), ((0.0, 0.5, 0.5), "b.zarr")):
        settings = load_settings(tiny, {"preprocess": {"split_fractions": fractions}})
        preprocess_dataset(one, tmp_path / store, settings, serial_runner)
    assert len(SliceStore.open(tmp_path / "a.zarr").cases("train")) == 1
    with pytest.raises(LiverpipeError, match="the store has no train cases") as err:
        start_run(tmp_path / "runs", tmp_path / "b.zarr", load_settings(tiny))
    assert "Fix:" in str(err.value) and not (tmp_path / "runs").exists()
    (tmp_path / "taken").write_text("a file")  # as the train-all flow passes its runs path
    with pytest.raises(LiverpipeError, match=r"this is a file, so .* cannot be the runs"):
        start_run(tmp_path / "taken", tmp_path / "a.zarr", load_settings(tiny))


def test_tumour_crops_near_the_roi_edge_hold_the_scan_not_fake_air(tiny_store: Path) -> None:
    """The resident region around each liver holds every crop the sampler can draw (a
    centre up to the jitter or a quarter crop beyond the ROI, plus half a crop): inside
    the stored slice it is the scan, liver-relative; beyond it, air."""
    from liverpipe.roi import margin_voxels, relative, relative_gain
    from liverpipe.train import stage_table

    store = SliceStore.open(tiny_store)
    cfg = load_settings(TINY).tumour
    _, prepared = stage_table(store, store.cases("train"), cfg, CPU)
    h, w = cfg.crop_size
    for case_id, case in prepared.items():
        stored = store.case(case_id)
        _, jy, jx = margin_voxels(cfg.roi_jitter_mm, stored.meta.spacing)
        reach_y, reach_x = max(jy, h // 4) + h // 2, max(jx, w // 4) + w // 2
        assert case.region.y0 <= case.roi.y0 - reach_y and case.region.y1 >= case.roi.y1 + reach_y
        assert case.region.x0 <= case.roi.x0 - reach_x and case.region.x1 >= case.roi.x1 + reach_x
        image, label = stored.load()
        t = stored.meta.intensity
        decoded = image.astype(np.float32) * t.stored_scale + t.stored_offset
        inside = case.region.clip(label.shape)
        local = tuple(
            slice(a - b, c - b)
            for a, b, c in (
                (inside.z0, case.region.z0, inside.z1),
                (inside.y0, case.region.y0, inside.y1),
                (inside.x0, case.region.x0, inside.x1),
            )
        )
        held = case.image.numpy()
        median = float(np.median(decoded[inside.slices][label[inside.slices] > 0]))
        expected = relative(
            decoded[inside.slices],
            median,
            relative_gain(t.hu_scale, cfg.relative_window_hu),
            cfg.relative_clip,
        )
        np.testing.assert_allclose(held[local], expected, atol=1e-5)
        np.testing.assert_array_equal(case.label.numpy()[local], label[inside.slices])
        outside = np.ones(held.shape, bool)
        outside[local] = False
        if outside.any():
            assert np.all(held[outside] == held[local].min())  # air, the scan's lowest value
            assert not case.label.numpy()[outside].any()
