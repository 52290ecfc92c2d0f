"""Random 2.5D training samples per second, side by side on the same phantoms:

  (1) liverpipe streaming: Zarr store, reader threads, prefetch (the CPU training path);
  (2) liverpipe resident: every train slice in one tensor on the device (CPU here when no CUDA);
  (3) naive NIfTI: decode the NIfTI volume for every sample (a Kaggle-style Dataset);
  (4) MONAI CacheDataset: LoadImaged, Orientation, Spacing, ScaleIntensityRanged cached
      in RAM, then random 3-slice crops from the cached tensors.

Usage: python bench/loader.py [--cases 4] [--batches 40] [--out bench/out/loader]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from liverpipe.preprocess import dask_map, preprocess_dataset
from liverpipe.settings import TrainConfig, load_settings
from liverpipe.synth.phantom import plan_case, render_case
from liverpipe.synth.writer import write_case
from liverpipe.train import ResidentSource, SliceSampler, SliceTable, StreamingSource
from storage import SliceStore

BATCH = 16


def _data(root: Path, cases: int) -> Path:
    if root.exists():
        shutil.rmtree(root)
    chosen = [
        i
        for i in range(200)
        if plan_case(31, i, "full")[1].compressed
        and 80 <= plan_case(31, i, "full")[1].shape[0] <= 160
    ][:cases]
    for i in chosen:
        write_case(render_case(31, i, "full"), root)
    return root


def _rate(fn, batches: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(batches):
        fn()
    return batches * BATCH / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("bench/out/loader"))
    args = parser.parse_args()
    data = _data(args.out / "data", args.cases)
    store_path = args.out / "store.zarr"
    if store_path.exists():
        shutil.rmtree(store_path)
    settings = load_settings(None, {"preprocess": {"split_fractions": (1.0, 0.0, 0.0)}})
    preprocess_dataset(data, store_path, settings, lambda f, i, k: dask_map(f, i, k, 2))
    store = SliceStore.open(store_path)
    table = SliceTable.from_store(store, store.cases("train"))
    sampler = SliceSampler(table, (1 / 3, 1 / 3), seed=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows: dict[str, float] = {}

    cache_gb = TrainConfig().stream_cache_gb
    for label, cache_bytes in (
        (
            f"(1) liverpipe streaming (4 threads, prefetch 4, chunk cache {cache_gb:g} GB: the default)",
            int(cache_gb * 2**30),
        ),
        ("(1b) liverpipe streaming, no chunk cache (every sample decoded from Zarr)", 0),
    ):
        streaming = StreamingSource(store, table, 3, threads=4, prefetch=4, cache_bytes=cache_bytes)
        for _ in range(4):
            streaming.submit(sampler.draw(BATCH))

        def stream_batch() -> None:
            streaming.next()  # noqa: B023 - used before the loop moves on
            streaming.submit(sampler.draw(BATCH))  # noqa: B023

        rows[label] = _rate(stream_batch, args.batches)
        streaming.close()
    resident = ResidentSource(store, table, 3, device)
    rows[f"(2) liverpipe resident ({device.type})"] = _rate(
        lambda: resident.batch(sampler.draw(BATCH)), args.batches
    )

    images = sorted((data / "imagesTr").iterdir())
    rng = np.random.default_rng(0)

    def nifti_batch() -> None:
        for _ in range(BATCH):
            volume = nib.load(images[rng.integers(len(images))]).get_fdata(dtype=np.float32)
            z = int(rng.integers(1, volume.shape[2] - 1))
            np.ascontiguousarray(volume[:, :, z - 1 : z + 2])

    rows["(3) naive: decode the NIfTI per sample"] = _rate(nifti_batch, max(1, args.batches // 20))

    from monai.data import CacheDataset
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    chain = Compose(
        [
            LoadImaged(keys="image"),
            EnsureChannelFirstd(keys="image"),
            Orientationd(keys="image", axcodes="RAS"),
            Spacingd(keys="image", pixdim=(1.0, 1.0, 2.5)),
            ScaleIntensityRanged(keys="image", a_min=-200, a_max=250, b_min=0, b_max=1, clip=True),
        ]
    )
    start = time.perf_counter()
    cache = CacheDataset(
        [{"image": str(p)} for p in images], chain, cache_rate=1.0, num_workers=2, progress=False
    )
    cache_s = time.perf_counter() - start
    cached = [cache[i]["image"] for i in range(len(cache))]

    def monai_batch() -> None:
        for _ in range(BATCH):
            volume = cached[int(rng.integers(len(cached)))]
            z = int(rng.integers(1, volume.shape[-1] - 1))
            volume[0, :, :, z - 1 : z + 2].permute(2, 0, 1).contiguous()

    rows[f"(4) MONAI CacheDataset (cache built in {cache_s:.0f} s)"] = _rate(
        monai_batch, args.batches
    )
    naive = rows["(3) naive: decode the NIfTI per sample"]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, device {device}; {len(images)} full-size cases, k=3, batch {BATCH}"
    )
    print("| loader | samples/s | vs naive NIfTI |")
    print("|---|---|---|")
    for name, rate in rows.items():
        print(f"| {name} | {rate:.0f} | {rate / naive:.0f}x |")


if __name__ == "__main__":
    main()
