"""Write phantom cases as an MSD-layout dataset (imagesTr/, labelsTr/, dataset.json)."""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, ornt_transform

from liverpipe.labels import LABEL_NAMES
from liverpipe.synth.phantom import PhantomCase, Size, render_case

__all__ = ["generate_dataset", "to_nifti", "write_case", "write_dataset_json"]


def to_nifti(case: PhantomCase, data: np.ndarray, *, is_label: bool) -> nib.Nifti1Image:
    """Encode a canonical (Z, Y, X) array as the case's file: orientation, dtype, codes."""
    acq = case.acquisition
    ras = nib.Nifti1Image(np.asarray(data).transpose(2, 1, 0), acq.affine)
    target = axcodes2ornt(tuple(acq.orientation))
    image = ras.as_reoriented(ornt_transform(axcodes2ornt(("R", "A", "S")), target))
    values = np.asarray(image.dataobj)
    if is_label:
        out = values.astype(np.float32 if acq.label_float else np.uint8)
        image = nib.Nifti1Image(out, image.affine)
    elif acq.image_dtype == "int16":
        image = nib.Nifti1Image(
            np.clip(np.rint(values), -1024, 3071).astype(np.int16), image.affine
        )
    elif acq.image_dtype == "uint16":
        raw = np.clip(np.rint((values + 1024.0) / acq.uint16_slope), 0, 65535).astype(np.uint16)
        image = nib.Nifti1Image(raw, image.affine)
        image.header.set_slope_inter(acq.uint16_slope, -1024.0)
    else:
        image = nib.Nifti1Image(values.astype(np.float32), image.affine)
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=0 if acq.qform_only else 1)
    image.header.set_xyzt_units("mm", "sec")
    return image


def write_case(case: PhantomCase, root: Path) -> tuple[Path, Path]:
    """Write image and label; each file appears atomically (written to a hidden temp name)."""
    ext = ".nii.gz" if case.acquisition.compressed else ".nii"
    paths = (root / "imagesTr" / f"{case.case_id}{ext}", root / "labelsTr" / f"{case.case_id}{ext}")
    for path, data, is_label in ((paths[0], case.hu, False), (paths[1], case.label, True)):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        nib.save(to_nifti(case, data, is_label=is_label), tmp)
        os.replace(tmp, path)
    return paths


def write_dataset_json(root: Path, pairs: Iterable[tuple[Path, Path]]) -> Path:
    """Write an MSD-style dataset.json with paths relative to ``root``."""
    training = [
        {
            "image": f"./{img.relative_to(root).as_posix()}",
            "label": f"./{lab.relative_to(root).as_posix()}",
        }
        for img, lab in pairs
    ]
    meta = {
        "name": "LiverPhantom",
        "description": "Synthetic abdominal CT phantoms with liver and tumour labels (liverpipe synth)",
        "reference": "liverpipe",
        "licence": "CC0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in LABEL_NAMES.items()},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
    }
    path = root / "dataset.json"
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path


#: One BLAS thread per rendering process. Rendering calls ``np.matmul`` (OpenBLAS), whose
#: threads spin while they wait: N processes with N threads each oversubscribe N cores.
#: 6 full-size phantoms, 2 processes on 2 cores: 41.9 s with the default threads, 17.8 s
#: with one each, and byte-identical files (docs/benchmarks.md).
ONE_BLAS_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@contextmanager
def _one_blas_thread_in_children() -> Iterator[None]:
    """Processes spawned inside this block start with :data:`ONE_BLAS_THREAD` (BLAS reads
    it when it loads, so the children must be spawned, not forked from this process)."""
    saved = {name: os.environ.get(name) for name in ONE_BLAS_THREAD}
    os.environ.update(ONE_BLAS_THREAD)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _render_and_write(args: tuple[int, int, Size, Path]) -> tuple[Path, Path]:
    seed, index, size, root = args
    return write_case(render_case(seed, index, size), root)


def generate_dataset(
    root: Path,
    cases: int,
    seed: int = 0,
    size: Size = "small",
    workers: int = 1,
    on_case: Callable[[tuple[Path, Path]], None] | None = None,
) -> list[tuple[Path, Path]]:
    """Render and write ``cases`` phantoms plus dataset.json; returns (image, label) paths.

    Case ``i`` depends only on ``(seed, i)``, so the output is the same for any ``workers``.
    """
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(seed, i, size, root) for i in range(cases)]
    pairs: list[tuple[Path, Path]] = []
    if workers > 1 and cases > 1:
        spawn = multiprocessing.get_context("spawn")
        with (
            _one_blas_thread_in_children(),
            ProcessPoolExecutor(max_workers=workers, mp_context=spawn) as pool,
        ):
            for pair in pool.map(_render_and_write, jobs):
                pairs.append(pair)
                if on_case:
                    on_case(pair)
    else:
        for job in jobs:
            pairs.append(_render_and_write(job))
            if on_case:
                on_case(pairs[-1])
    write_dataset_json(root, pairs)
    return pairs
