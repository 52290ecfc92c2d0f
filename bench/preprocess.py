"""Preprocessing throughput, side by side on the same full-size phantoms, 2 processes each:

  (a) liverpipe: validation, SimpleITK resampling to 1x1x2.5 mm, crop to 384x384,
      window normalisation, float16 + uint8 into the Zarr store (Dask LocalCluster);
  (b) MONAI: LoadImage, EnsureChannelFirst, Orientation RAS, Spacing, ScaleIntensityRange,
      saved to .npy (image bilinear, label nearest);
  (c) naive: nibabel get_fdata, scipy zoom order 3 (label order 0), np.save;
  (d) I/O floor: decompress image and label, write the bytes liverpipe stores.

Usage: python bench/preprocess.py [--cases 4] [--out bench/out/preprocess]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from liverpipe.preprocess import dask_map, preprocess_dataset
from liverpipe.settings import load_settings
from liverpipe.synth.phantom import plan_case, render_case
from liverpipe.synth.writer import write_case

TARGET = (1.0, 1.0, 2.5)


def _dataset(root: Path, cases: int) -> list[tuple[Path, Path]]:
    """Full-size (512x512) int16 .nii.gz phantoms with 120-200 slices."""
    chosen = [
        i
        for i in range(400)
        if (a := plan_case(21, i, "full")[1]).compressed
        and a.image_dtype == "int16"
        and 120 <= a.shape[0] <= 200
    ][:cases]
    if root.exists():
        shutil.rmtree(root)
    with ProcessPoolExecutor(2) as pool:
        return list(pool.map(_render, [(i, root) for i in chosen]))


def _reused(root: Path, cases: int) -> list[tuple[Path, Path]] | None:
    """The phantoms a previous run rendered, when there are exactly ``cases`` of them."""
    images = sorted((root / "imagesTr").glob("*.nii.gz")) if root.is_dir() else []
    if len(images) != cases:
        return None
    return [(p, root / "labelsTr" / p.name) for p in images]


def _render(args: tuple[int, Path]) -> tuple[Path, Path]:
    index, root = args
    return write_case(render_case(21, index, "full"), root)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _monai(pair: tuple[Path, Path], out: Path) -> float:
    import torch
    from monai.transforms import (
        Compose,
        EnsureChannelFirst,
        LoadImage,
        Orientation,
        ScaleIntensityRange,
        Spacing,
    )

    torch.set_num_threads(1)
    image_chain = Compose(
        [
            LoadImage(image_only=True),
            EnsureChannelFirst(),
            Orientation(axcodes="RAS"),
            Spacing(pixdim=TARGET, mode="bilinear"),
            ScaleIntensityRange(-200, 250, 0.0, 1.0, clip=True),
        ]
    )
    label_chain = Compose(
        [
            LoadImage(image_only=True),
            EnsureChannelFirst(),
            Orientation(axcodes="RAS"),
            Spacing(pixdim=TARGET, mode="nearest"),
        ]
    )
    name = pair[0].name.split(".")[0]
    np.save(out / f"{name}_image.npy", np.asarray(image_chain(str(pair[0]))).astype(np.float16))
    np.save(out / f"{name}_label.npy", np.asarray(label_chain(str(pair[1]))).astype(np.uint8))
    return _peak_mb()


def _naive(pair: tuple[Path, Path], out: Path) -> float:
    import nibabel as nib
    from scipy.ndimage import zoom

    name = pair[0].name.split(".")[0]
    for path, order, dtype in ((pair[0], 3, np.float32), (pair[1], 0, np.uint8)):
        img = nib.load(path)
        factors = np.array(img.header.get_zooms()[:3]) / np.array(TARGET)
        np.save(
            out / f"{name}_{order}.npy", zoom(img.get_fdata(), factors, order=order).astype(dtype)
        )
    return _peak_mb()


def _floor(pair: tuple[Path, Path], out: Path, out_bytes: int) -> float:
    from isal import igzip

    for path in pair:
        igzip.decompress(path.read_bytes())
    (out / f"{pair[0].name}.bin").write_bytes(b"\0" * out_bytes)
    return _peak_mb()


def _pool(
    fn: Callable[..., float], pairs: list[tuple[Path, Path]], out: Path, *extra: object
) -> tuple[float, float]:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(2) as pool:
        peaks = list(pool.map(fn, pairs, [out] * len(pairs), *[[e] * len(pairs) for e in extra]))
    return time.perf_counter() - start, max(peaks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench/out/preprocess"))
    parser.add_argument(
        "--paths",
        default="liverpipe,monai,naive,floor",
        help="comma-separated subset to run (for quick A/B runs; results need all four)",
    )
    parser.add_argument(
        "--reuse-data", action="store_true", help="keep the phantoms of a previous run"
    )
    args = parser.parse_args()
    wanted = set(args.paths.split(","))
    pairs = _reused(args.out / "data", args.cases) if args.reuse_data else None
    pairs = pairs or _dataset(args.out / "data", args.cases)
    import nibabel as nib

    shapes = [nib.load(p).shape for p, _ in pairs]
    raw_mb = np.mean([np.prod(s) * 2 / 1e6 for s in shapes])
    settings = load_settings(None, {"store": {"workers": 2}})
    store = args.out / "store.zarr"
    if store.exists():
        shutil.rmtree(store)
    start = time.perf_counter()
    peaks: list[float] = []

    def runner(fn, items, keys):  # type: ignore[no-untyped-def]
        for item, result in dask_map(fn, items, keys, 2):
            peaks.append(getattr(result, "peak_rss_mb", 0.0))
            yield item, result

    summary = preprocess_dataset(args.out / "data", store, settings, runner)
    ours = time.perf_counter() - start
    assert summary.ok and len(summary.processed) == len(pairs), summary.failed
    from storage import SliceStore

    s = SliceStore.open(store)
    out_bytes = int(np.mean([np.prod(s.case(c).meta.shape) * 3 for c in s.cases()]))
    skipped = (float("nan"), float("nan"))
    monai, monai_peak = _pool(_monai, pairs, args.out / "monai") if "monai" in wanted else skipped
    naive, naive_peak = _pool(_naive, pairs, args.out / "naive") if "naive" in wanted else skipped
    floor, floor_peak = (
        _pool(_floor, pairs, args.out / "floor", out_bytes) if "floor" in wanted else skipped
    )
    n = len(pairs)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; {n} cases {shapes}, int16 .nii.gz, mean raw {raw_mb:.0f} MB"
    )
    print(
        "| path | wall (s) | cases/min | per case (s) | liverpipe speed-up | peak RSS per process |"
    )
    print("|---|---|---|---|---|---|")
    for name, wall, peak in (
        ("(a) liverpipe preprocess (Dask, 2 workers)", ours, max(peaks)),
        ("(b) MONAI chain", monai, monai_peak),
        ("(c) naive nibabel + scipy zoom(order=3)", naive, naive_peak),
        ("(d) I/O floor", floor, floor_peak),
    ):
        print(
            f"| {name} | {wall:.1f} | {60 * n / wall:.1f} | {wall * 2 / n:.2f} | {wall / ours:.2f}x | {peak:.0f} MB |"
        )
    print(
        "\nliverpipe wall time includes Dask LocalCluster start-up and content hashing; per-case seconds assume 2 parallel processes."
    )


if __name__ == "__main__":
    main()
