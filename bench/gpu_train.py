"""GPU training throughput of the three models on a full-size phantom store.

For each model: a real ``train()`` run (``--steps`` at ``--size``², batch ``--batch``,
bf16 autocast and channels_last on CUDA, GPU-resident batches when they fit), then a
paired measurement of the same step fed from the store vs fed one fixed in-memory batch.
Reports images/s and the data-wait fraction (from ``history.jsonl``, first log interval
dropped as warm-up), the real/fixed step-time ratio (goal ≤ 1.05) and peak GPU memory.

Usage: python bench/gpu_train.py [--cases 6] [--size 384] [--steps 200] [--batch 16]
       python bench/gpu_train.py --dry-run   # tiny CPU run that checks the script works
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from liverpipe._system import available_cpus
from liverpipe.models import MODELS
from liverpipe.preprocess import preprocess_dataset, serial_runner
from liverpipe.settings import Settings, load_settings
from liverpipe.synth.writer import generate_dataset
from liverpipe.train import make_source, stage_table
from liverpipe.train.loop import _BatchStream, _build, _Dist, _one_step, train
from storage import SliceStore


def _settings(args: argparse.Namespace) -> Settings:
    spacing = (5.0, 5.0, 5.0) if args.dry_run else (1.0, 1.0, 2.5)
    return load_settings(
        None,
        {
            "preprocess": {
                "target_spacing": spacing,
                "slice_size": (args.size, args.size),
                "split_fractions": (0.8, 0.2, 0.0),
            },
            "train": {
                "steps": args.steps,
                "batch_size": args.batch,
                "log_every": max(1, args.steps // 4),
                "val_every": args.steps,
                "warmup_steps": max(1, args.steps // 10),
                "encoder": "resnet34",
            },
        },
    )


def _store(args: argparse.Namespace, settings: Settings) -> Path:
    data, store = args.out / "data", args.out / "store.zarr"
    shutil.rmtree(args.out, ignore_errors=True)
    start = time.perf_counter()
    size = "small" if args.dry_run else "full"
    generate_dataset(data, args.cases, seed=7, size=size, workers=min(args.cases, available_cpus()))
    print(f"phantoms: {args.cases} {size} cases in {time.perf_counter() - start:.1f} s", flush=True)
    start = time.perf_counter()
    preprocess_dataset(data, store, settings, serial_runner)
    slices = sum(
        SliceStore.open(store).case(c).meta.shape[0] for c in SliceStore.open(store).cases()
    )
    print(f"store: {slices} slices in {time.perf_counter() - start:.1f} s", flush=True)
    return store


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _paired(store_path: Path, settings: Settings, steps: int) -> tuple[float, float]:
    """Mean step time fed from the store vs fed one fixed batch (same model, same step)."""
    import segmentation_models_pytorch as smp

    cfg, dist = settings.train, _Dist()
    device = dist.device()
    store = SliceStore.open(store_path)

    table, prepared = stage_table(store, store.cases("train"), cfg, device)
    run = _build(cfg, table, device, dist)
    losses = (smp.losses.DiceLoss("multiclass", from_logits=True), torch.nn.CrossEntropyLoss())
    source = make_source(cfg, store, table, prepared, run.sampler, device)
    stream = _BatchStream(run.sampler, source, cfg.batch_size, cfg.prefetch)
    try:
        fixed = tuple(t.to(device) for t in stream.next())
        for _ in range(3):  # warm-up: cuDNN autotuning, allocator
            _one_step(run, run.model, *fixed, cfg, losses)
        times = {}
        for name in ("real", "fixed", "real2"):
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                images, labels = fixed if name == "fixed" else stream.next()
                _one_step(
                    run,
                    run.model,
                    images.to(device, non_blocking=True),
                    labels.to(device, non_blocking=True),
                    cfg,
                    losses,
                )
            _sync(device)
            times[name] = (time.perf_counter() - start) / steps
    finally:
        stream.close()
    return (times["real"] + times["real2"]) / 2, times["fixed"]


def _history_rates(run_dir: Path) -> tuple[float, float]:
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "images_per_s" in r][1:] or [
        r for r in rows if "images_per_s" in r
    ]
    return float(np.mean([r["images_per_s"] for r in logged])), float(
        np.mean([r["data_wait"] for r in logged])
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--paired-steps", type=int, default=30)
    parser.add_argument(
        "--dry-run", action="store_true", help="Tiny CPU run: 3 small cases, 64², 4 steps."
    )
    parser.add_argument("--out", type=Path, default=Path("bench/out/gpu"))
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    if args.dry_run:
        args.cases, args.size, args.steps, args.batch, args.paired_steps = 3, 64, 4, 2, 2
    settings = _settings(args)
    cuda = torch.cuda.is_available()
    device = (
        torch.cuda.get_device_name(0)
        if cuda
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    )
    print(f"device: {device}; torch {torch.__version__}", flush=True)
    store = _store(args, settings)
    results = []
    for name in MODELS:
        model_settings = settings.model_copy(
            update={"train": settings.train.model_copy(update={"model": name})}
        )
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        train(store, args.out / "runs" / name, model_settings)
        wall = time.perf_counter() - start
        rate, wait = _history_rates(args.out / "runs" / name)
        real, fixed = _paired(store, model_settings, args.paired_steps)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        row = {
            "model": name,
            "images_per_s": rate,
            "data_wait": wait,
            "step_real_ms": real * 1e3,
            "step_fixed_ms": fixed * 1e3,
            "real_over_fixed": real / fixed,
            "peak_gpu_gib": peak,
            "train_wall_s": wall,
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    print(
        f"\n| model | images/s | data wait | step real / fixed (ms) | ratio | peak GPU GiB | {args.steps} steps wall s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['model']} | {r['images_per_s']:.0f} | {r['data_wait']:.1%} | {r['step_real_ms']:.1f} / {r['step_fixed_ms']:.1f} | {r['real_over_fixed']:.3f} | {r['peak_gpu_gib']:.2f} | {r['train_wall_s']:.1f} |"
        )
    record = {
        "device": device,
        "torch": torch.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
