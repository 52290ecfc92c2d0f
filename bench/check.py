"""Benchmark `liverpipe check` against the naive notebook check (nibabel get_fdata).

One run, side by side, on the same files:
  (a) liverpipe: header checks, then ISA-L decompression and native-dtype value checks;
  (b) naive: nibabel ``get_fdata()`` (float64) of image and label, np.unique on the label;
  (c) header only: what a refusal costs when the header is absurd.

Usage: python bench/check.py [--cases 100] [--full 4] [--out bench/out/check]
Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from liverpipe.errors import InvalidScanError
from liverpipe.io import discover, read_header
from liverpipe.preprocess import check_dataset
from liverpipe.settings import CheckConfig
from liverpipe.synth import generate_dataset


def _make_dataset(root: Path, cases: int, unique: int, size: str) -> Path:
    """``unique`` rendered phantoms, copied under new names up to ``cases``."""
    if root.exists():
        shutil.rmtree(root)
    generate_dataset(root, unique, seed=11, size=size, workers=os.cpu_count() or 1)  # type: ignore[arg-type]
    (root / "dataset.json").unlink()
    sources = sorted((root / "imagesTr").iterdir())
    for i in range(unique, cases):
        src = sources[i % unique]
        suffix = ".nii.gz" if src.name.endswith(".gz") else ".nii"
        for sub in ("imagesTr", "labelsTr"):
            shutil.copyfile(root / sub / src.name, root / sub / f"copy_{i:03d}{suffix}")
    return root


def _naive(root: Path) -> float:
    start = time.perf_counter()
    for case in discover(root).training:
        image = nib.load(case.image).get_fdata()
        label = nib.load(case.label).get_fdata()
        assert np.isfinite(image).all() and set(np.unique(label)) <= {0.0, 1.0, 2.0}
    return time.perf_counter() - start


def _liverpipe(root: Path) -> tuple[float, bool]:
    start = time.perf_counter()
    ok = all(r.ok for r in check_dataset(discover(root), CheckConfig()))
    return time.perf_counter() - start, ok


def _absurd_header(root: Path) -> float:
    header = nib.Nifti1Header()
    header.set_data_shape((4096, 4096, 4096))
    header.set_data_dtype(np.int16)
    path = root / "absurd.nii"
    path.write_bytes(header.binaryblock + b"\0" * 8)
    start = time.perf_counter()
    for _ in range(100):
        try:
            read_header(path)
        except InvalidScanError:
            pass
    return (time.perf_counter() - start) / 100


def _row(name: str, root: Path) -> str:
    files = [p for p in root.rglob("*.nii*")]
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    n = len(discover(root).training)
    ours, ok = _liverpipe(root)
    naive = _naive(root)
    return (
        f"| {name} | {n} | {megabytes:.0f} MB | {ours:.1f} s ({n / ours:.1f} cases/s) | "
        f"{naive:.1f} s ({n / naive:.1f} cases/s) | {naive / ours:.1f}x | {'yes' if ok else 'NO'} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--full", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench/out/check"))
    args = parser.parse_args()
    rows = [
        _row(
            f"small phantoms (96x96), {args.cases} cases",
            _make_dataset(args.out / "small", args.cases, 10, "small"),
        )
    ]
    if args.full:
        full = _make_dataset(args.out / "full", args.full, args.full, "full")
        rows.append(_row("full phantoms (512x512, 40-240 slices)", full))
    refusal = _absurd_header(args.out)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(
        "| dataset | cases | on disk | liverpipe check | naive get_fdata | speed-up | all valid |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nRefusing a header that claims 4096^3 voxels: {refusal * 1e3:.2f} ms (no data read).")
    print(
        f"Peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )


if __name__ == "__main__":
    main()
