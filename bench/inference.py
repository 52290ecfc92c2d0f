"""Forward-pass speed of the three models in inference, by memory format and threads.

Prediction and evaluation spend most of their time in the models' forward passes. This
measures one forward of a batch of 2.5D inputs for each model and stage of a config
(random weights: speed does not depend on them), with the input and weights in the
default contiguous layout and in channels_last (the layout training uses), with 1 thread
and with every core. One run, in this process.

Usage:
  python bench/inference.py [--config configs/cpu.toml] [--batch 16] [--size 128]
         [--repeats 3] [--json OUT]
Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from liverpipe._system import available_cpus
from liverpipe.models import model_for
from liverpipe.settings import load_settings

MODELS = ("unetplusplus", "manet", "deeplabv3plus")
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def _seconds(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Mean seconds of one forward, after one warm-up pass."""
    with torch.inference_mode():
        model(x)
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
    return (time.perf_counter() - start) / repeats


def measure(config: Path, batch: int, size: int, repeats: int) -> list[dict[str, Any]]:
    """One row per (stage, model, threads, layout): seconds per batch and slices/s."""
    settings = load_settings(config)
    rows = []
    for threads in sorted({1, available_cpus()}):
        torch.set_num_threads(threads)
        for stage in ("liver", "tumour"):
            for name in MODELS:
                cfg = settings.stage(stage).model_copy(update={"model": name})
                model = model_for(cfg).eval()
                x = torch.randn(batch, cfg.context_slices, size, size)
                for layout, fmt in LAYOUTS.items():
                    model = model.to(memory_format=fmt)
                    seconds = _seconds(model, x.contiguous(memory_format=fmt), repeats)
                    rows.append(
                        {
                            "stage": stage,
                            "model": name,
                            "threads": threads,
                            "layout": layout,
                            "seconds": round(seconds, 4),
                            "slices_per_s": round(batch / seconds, 1),
                        }
                    )
                    print(rows[-1], flush=True)
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| stage | model | threads | contiguous s/batch | channels_last s/batch | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    keyed = {(r["stage"], r["model"], r["threads"], r["layout"]): r["seconds"] for r in rows}
    for (stage, model, threads, layout), a in keyed.items():
        if layout != "contiguous":
            continue
        b = keyed[(stage, model, threads, "channels_last")]
        lines.append(f"| {stage} | {model} | {threads} | {a:.3f} | {b:.3f} | {a / b:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/cpu.toml"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=128, help="input slices are size x size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = measure(args.config, args.batch, args.size, args.repeats)
    machine = f"{platform.machine()}, {available_cpus()} CPUs, torch {torch.__version__}"
    print(f"\n{machine}; batch {args.batch} x {args.size}^2, config {args.config}\n")
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
