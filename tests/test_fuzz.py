"""Fuzzing the readers: corrupted copies of the real CT only ever raise LiverpipeError.

1,200 files, made reproducibly (seeded) from a subsampled copy of the real CT in
``../shared/data/real-ct``: random byte changes in the 348-byte header and in the first
data block, truncations, and gzip streams cut short or damaged. ``check`` and the
prediction path read every one; the model predicts every fourth that preprocesses. No
file may raise anything but a ``LiverpipeError``, take more than 20 s, or make numpy
allocate more than the size caps allow.
"""

from __future__ import annotations

import gzip
import signal
import tracemalloc
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from liverpipe.errors import LiverpipeError
from liverpipe.infer import Predictor, prepare_scan
from liverpipe.io import CaseFiles
from liverpipe.models import load_cascade
from liverpipe.preprocess import check_case
from liverpipe.settings import CheckConfig, PreprocessConfig

pytestmark = pytest.mark.slow

FILES = 1200
SECONDS = 20
CAPS = CheckConfig(max_dim=256, max_voxels=400_000, min_slices=3, workers=1)
#: numpy may hold the compressed file, the decoded volume at the cap (float64 at most),
#: a float32 copy and the stored grid; beyond this the caps did not hold.
BUDGET = 16 * CAPS.max_voxels * 8


@pytest.fixture(scope="module")
def sources(real_ct: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """Plain NIfTI-1 and NIfTI-2 bytes of the real CT, subsampled to 6 mm (61 x 51 x 15)."""
    image = nib.load(real_ct[0])
    data = np.asanyarray(image.dataobj)[::2, ::2, ::2]
    affine = image.affine.copy()
    affine[:3, :3] *= 2
    out = []
    folder = tmp_path_factory.mktemp("fuzz-sources")
    for cls in (nib.Nifti1Image, nib.Nifti2Image):
        copy = cls(np.ascontiguousarray(data), affine)
        copy.set_qform(affine, code=1)
        copy.set_sform(affine, code=1)
        path = folder / f"{cls.__name__}.nii"
        nib.save(copy, path)
        out.append(path.read_bytes())
    return out


def _corrupt(plain: bytes, rng: np.random.Generator) -> tuple[bytes, str, str]:
    """One corrupted file: (bytes, suffix, kind of damage)."""
    kind = str(rng.choice(["header", "data", "truncate", "gzip-cut", "gzip-damage"]))
    blob = bytearray(plain)
    header = 348 if blob[:4] == (348).to_bytes(4, "little") else 540
    if kind == "header":
        for _ in range(int(rng.integers(1, 6))):
            blob[int(rng.integers(0, header))] = int(rng.integers(0, 256))
    elif kind == "data":
        start = 352 if header == 348 else 544
        for _ in range(int(rng.integers(1, 64))):
            blob[start + int(rng.integers(0, 4096))] = int(rng.integers(0, 256))
        if rng.random() < 0.3:  # and the header, too
            blob[int(rng.integers(0, header))] = int(rng.integers(0, 256))
    gz = rng.random() < 0.6 or kind.startswith("gzip")
    out = gzip.compress(bytes(blob), compresslevel=1) if gz else bytes(blob)
    if kind == "truncate":
        out = out[: int(rng.integers(0, len(out)))]
    elif kind == "gzip-cut":  # a member cut short, sometimes after a complete first member
        cut = out[: int(rng.integers(10, len(out) - 8))]
        out = (gzip.compress(bytes(blob[:header])) + cut) if rng.random() < 0.3 else cut
    elif kind == "gzip-damage":
        damaged = bytearray(out)
        for _ in range(int(rng.integers(1, 8))):
            damaged[int(rng.integers(10, len(damaged)))] ^= 1 << int(rng.integers(0, 8))
        out = bytes(damaged)
    return out, ".nii.gz" if gz else ".nii", kind


@contextmanager
def _deadline(seconds: int, what: str) -> Iterator[None]:
    def fail(*_: object) -> None:
        raise TimeoutError(f"{what} took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _only_liverpipe_errors(step: object, *args: object, **kwargs: object) -> object:
    try:
        return step(*args, **kwargs)  # type: ignore[operator]
    except LiverpipeError as err:
        return err


def test_corrupted_files_raise_only_liverpipe_errors(
    sources: list[bytes], tmp_path: Path, tiny_runs: Path
) -> None:
    config = PreprocessConfig(target_spacing=(5.0, 5.0, 5.0), slice_size=(64, 64))
    predictor = Predictor([load_cascade(tiny_runs / "deeplabv3plus")])
    outcomes: Counter[str] = Counter()
    tracemalloc.start()
    try:
        for index in range(FILES):
            rng = np.random.default_rng(index)
            blob, suffix, kind = _corrupt(sources[index % 2], rng)
            path = tmp_path / f"fuzz_{index:04d}{suffix}"
            path.write_bytes(blob)
            what = f"{path.name} ({kind}, seed {index})"
            tracemalloc.reset_peak()
            with _deadline(SECONDS, what):
                report = check_case(CaseFiles(path.name, path, None, "test"), CAPS, config)
                prepared = _only_liverpipe_errors(prepare_scan, path, config, None, CAPS)
                if not isinstance(prepared, LiverpipeError) and index % 4 == 0:
                    predicted = _only_liverpipe_errors(predictor.predict, path)
                    outcomes["predicted"] += not isinstance(predicted, LiverpipeError)
            peak = tracemalloc.get_traced_memory()[1]
            assert peak < BUDGET, f"{what}: numpy peaked at {peak / 2**20:.0f} MiB"
            # check and the forward path agree on whether the file can be used
            assert report.ok == (not isinstance(prepared, LiverpipeError)), (what, report.errors)
            outcomes[f"{kind}:{'ok' if report.ok else 'refused'}"] += 1
            path.unlink()
    finally:
        tracemalloc.stop()
    # The corruptions hit both sides: many files refused, some still usable.
    refused = sum(n for k, n in outcomes.items() if k.endswith("refused"))
    print(dict(sorted(outcomes.items())))
    assert refused > FILES // 3 and outcomes["predicted"] > 10, outcomes


def test_a_zlib_bomb_is_refused_within_the_caps(tmp_path: Path) -> None:
    """A header claiming little data in front of a stream that inflates far beyond it."""
    image = nib.Nifti1Image(np.zeros((20, 20, 20), np.int16), np.eye(4))
    path = tmp_path / "bomb.nii"
    nib.save(image, path)
    stream = zlib.compressobj(9, zlib.DEFLATED, 31)
    payload = stream.compress(path.read_bytes() + bytes(200 << 20)) + stream.flush()
    (tmp_path / "bomb.nii.gz").write_bytes(payload)
    tracemalloc.start()
    try:
        report = check_case(CaseFiles("bomb", tmp_path / "bomb.nii.gz", None, "test"), CAPS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20  # the 200 MB of zeros beyond the header's data are never inflated
    assert report.errors == () or all("Fix:" in e for e in report.errors)
