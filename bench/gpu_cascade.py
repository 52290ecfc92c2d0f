"""The cascade with GPU-sized training, on the CPU demo's grid, scored on held-out phantoms.

What `make demo` does on 2 CPU cores, with the training a GPU affords: full-size phantoms
(``--train`` for the store, ``--held`` with another seed for scoring), the store of
``configs/cpu.toml`` (2 x 2 x 3 mm, 192 x 192), both stages of the three models with
``--liver-steps`` / ``--tumour-steps`` at batch ``--batch``, then ``bench/tumours.py``'s
measurement. Each phase's time goes into the JSON as it ends, so a run cut short still
reports what it finished.

Usage: python bench/gpu_cascade.py [--train 32] [--held 8] [--json OUT.json]
       python bench/gpu_cascade.py --dry-run   # 3 + 2 phantoms, a few steps, on the CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

from liverpipe._system import available_cpus
from liverpipe.preprocess import preprocess_dataset
from liverpipe.settings import load_settings
from liverpipe.synth.writer import generate_dataset
from liverpipe.train import train_all

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from tumours import measure, table  # noqa: E402


def _pool_runner(workers: int) -> Callable[..., Iterator[tuple[Any, Any]]]:
    """liverpipe's runner protocol on a process pool (the GPU image has no Dask)."""

    def run(
        fn: Callable[[Any], Any], items: Sequence[Any], keys: Sequence[str]
    ) -> Iterator[tuple[Any, Any]]:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(fn, item): item for item in items}
            for future in as_completed(futures):
                try:
                    yield futures[future], future.result()
                except Exception as err:
                    yield futures[future], err

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=32)
    parser.add_argument("--held", type=int, default=8)
    parser.add_argument("--liver-steps", type=int, default=1500)
    parser.add_argument("--tumour-steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("/tmp/liverpipe-cascade"))
    parser.add_argument("--json", type=Path, default=Path("bench/out/gpu_cascade.json"))
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if args.dry_run:
        args.train, args.held, args.liver_steps, args.tumour_steps, args.batch = 4, 2, 4, 4, 4
    workers = available_cpus()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    record: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
        "seconds": {},
    }

    def phase(name: str, start: float) -> None:
        record["seconds"][name] = round(time.perf_counter() - start, 1)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1, default=float))
        print(f"{name}: {record['seconds'][name]} s", flush=True)

    start = time.perf_counter()
    rendered = []

    def progress(pair: tuple[Path, Path]) -> None:
        # A run cut short in this phase still says how far it got (first H200 try, 2026-11-28).
        rendered.append(pair[0].name)
        record["phantoms_rendered"] = len(rendered)
        print(f"phantom {len(rendered)}: {time.perf_counter() - start:.1f} s", flush=True)

    print(f"rendering {args.train} + {args.held} phantoms on {workers} processes", flush=True)
    generate_dataset(
        args.out / "train", args.train, seed=0, size="full", workers=workers, on_case=progress
    )
    generate_dataset(
        args.out / "held", args.held, seed=9001, size="full", workers=workers, on_case=progress
    )
    phase("phantoms", start)
    steps = {"liver": args.liver_steps, "tumour": args.tumour_steps}
    settings = load_settings(
        REPO / "configs" / "cpu.toml",
        {
            "store": {"workers": workers},
            **{
                section: {
                    "steps": steps[stage],
                    "batch_size": args.batch,
                    "val_every": max(1, steps[stage] // 4),
                    "log_every": max(1, steps[stage] // 10),
                    "warmup_steps": max(1, steps[stage] // 20),
                }
                for section, stage in (("train", "liver"), ("tumour", "tumour"))
            },
        },
    )
    start = time.perf_counter()
    preprocess_dataset(args.out / "train", args.out / "store.zarr", settings, _pool_runner(workers))
    phase("preprocess", start)
    start = time.perf_counter()
    outcomes = train_all(args.out / "store.zarr", args.out / "runs", settings, gpus=[])
    record["training"] = {
        o.job: {"error": o.error, "best_score": o.result.best_score if o.result else None}
        for o in outcomes
    }
    phase("train", start)
    start = time.perf_counter()
    measured = measure(args.out / "runs", args.out / "held")
    record["tumours"] = {k: measured[k] for k in ("summary", "cases", "machine")}
    record["rows"] = measured["rows"]
    phase("measure", start)
    print(table(measured))


if __name__ == "__main__":
    main()
