"""Peak memory of one preprocessing worker on MSD's largest kind of scan.

Builds a 512 x 512 x N-slice int16 case (default 1000 slices, about 0.5 GB raw) by tiling
one full-size phantom's slices along z, with its label tiled alike, as plain ``.nii``
(and, with ``--gzip``, as ``.nii.gz`` too). Then, for each file, one fresh process runs
``liverpipe.preprocess.case.ingest_case`` (the task a Dask worker runs) under ``/usr/bin/time -v``
and reports its maximum resident set size, and the same process's size after the
imports alone, for the baseline.

Usage: python bench/memory.py [--slices 1000] [--gzip] [--json bench/out/memory.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]

_TASK = """
import resource, sys
from pathlib import Path
from liverpipe.preprocess.case import CaseJob, ingest_case
from liverpipe.preprocess.pipeline import effective_config_hash
from liverpipe.settings import load_settings
from storage import SliceStore
print("imports", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, flush=True)
if sys.argv[1] == "imports-only":
    raise SystemExit
image, label, store = (Path(a) for a in sys.argv[1:4])
cfg = load_settings(None).preprocess
config_hash = effective_config_hash(cfg, None)
record = {"preprocess": cfg.model_dump(mode="json"), "zscore": None}
SliceStore.open_or_create(store, config_hash, record, "bench")
result = ingest_case(CaseJob("big", image, label, store, cfg, config_hash))
assert result.ok, result.error
print("shape", result.shape, "seconds", round(result.seconds, 2), flush=True)
"""


def _tiled(source: Path, slices: int, out: Path, gzip: bool) -> tuple[Path, Path]:
    suffix = ".nii.gz" if gzip else ".nii"
    pairs = []
    for folder in ("imagesTr", "labelsTr"):
        img = nib.load(source.parent.parent / folder / source.name)
        data = np.asarray(img.dataobj)
        reps = -(-slices // data.shape[2])
        tiled = np.concatenate([data] * reps, axis=2)[:, :, :slices]
        tiled = np.ascontiguousarray(tiled.astype(np.int16 if folder == "imagesTr" else np.uint8))
        header = img.header.copy()
        header.set_data_dtype(tiled.dtype)
        path = out / folder / f"big{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(tiled, img.affine, header), path)
        pairs.append(path)
    return pairs[0], pairs[1]


def _peak(args: list[str]) -> tuple[float, str]:
    """Maximum RSS (MB) of one process running ``_TASK``, from /usr/bin/time -v."""
    done = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-c", _TASK, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    assert peak is not None, done.stderr
    return int(peak.group(1)) / 1024, done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=1000)
    parser.add_argument("--gzip", action="store_true", help="also measure the .nii.gz form")
    parser.add_argument(
        "--phantom",
        type=Path,
        default=None,
        help="an int16 full-size phantom image (default: render one, seed 21)",
    )
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "memory.json")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="liverpipe-memory-"))
    try:
        source = args.phantom
        if source is None:
            from liverpipe.synth.phantom import render_case
            from liverpipe.synth.writer import write_case

            source, _ = write_case(render_case(21, 4, "full"), root / "phantom")
        baseline, _ = _peak(["imports-only"])
        record: dict[str, object] = {
            "machine": f"{platform.machine()}, Python {platform.python_version()}",
            "slices": args.slices,
            "imports_only_mb": round(baseline, 1),
        }
        for gzip in (False, True) if args.gzip else (False,):
            image, label = _tiled(source, args.slices, root / ("gz" if gzip else "plain"), gzip)
            raw_mb = np.prod(nib.load(image).shape) * 2 / 2**20
            peak, out = _peak([str(image), str(label), str(root / f"store-{gzip}.zarr")])
            record["gzip" if gzip else "plain"] = {
                "raw_image_mb": round(float(raw_mb), 1),
                "peak_rss_mb": round(peak, 1),
                "peak_over_raw": round(peak / float(raw_mb), 2),
                "task": out.splitlines()[-1],
            }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
