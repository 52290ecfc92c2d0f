"""The docs/store.md snippet reads a real store with zarr alone."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
from conftest import REPO

from liverpipe.preprocess import preprocess_dataset, serial_runner
from liverpipe.settings import load_settings


def test_store_doc_snippet_runs(tmp_path: Path, phantom_dir: Path) -> None:
    store = tmp_path / "s.zarr"
    preprocess_dataset(
        phantom_dir, store, load_settings(REPO / "configs" / "tiny.toml"), serial_runner
    )
    text = (REPO / "docs" / "store.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert "liverpipe" not in snippet.replace('attrs["liverpipe"]', "")  # no liverpipe import
    namespace: dict[str, object] = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(snippet.replace('"STORE"', repr(str(store))), namespace)
    image, label, hu = (np.asarray(namespace[k]) for k in ("image", "label", "hu"))
    assert image.shape == label.shape and image.shape[1:] == (64, 64)
    assert -200.5 <= hu.min() and hu.max() <= 250.5
    assert 40 < np.median(hu[label == 1]) < 80  # phantom liver HU, recovered from the store
    assert "liver" in out.getvalue()
    affine = np.asarray(namespace["affine"])
    nz, ny, nx = image.shape
    first, last = affine @ [0, 0, 0, 1.0], affine @ [nx - 1, ny - 1, nz - 1, 1.0]
    np.testing.assert_allclose(np.asarray(namespace["centre_mm"]), (first + last) / 2)


def test_chunk_and_shard_shapes_are_the_documented_ones(tmp_path: Path, phantom_dir: Path) -> None:
    """docs/store.md states the chunk and shard layout; a real store must have exactly it."""
    import zarr

    store = tmp_path / "s.zarr"
    preprocess_dataset(
        phantom_dir, store, load_settings(REPO / "configs" / "tiny.toml"), serial_runner
    )
    text = (REPO / "docs" / "store.md").read_text()
    (chunk_z,) = re.findall(r"Chunks: `\((\d+), Y, X\)`", text)
    sharded = re.findall(r"shards of (\d+) slices", text)
    assert "no shards" in text or sharded
    root = zarr.open_group(str(store), mode="r")
    for case_id in root["cases"].group_keys():
        for name in ("image", "label"):
            array = root["cases"][case_id][name]
            _, y, x = array.shape
            assert array.chunks == (int(chunk_z), y, x)
            if sharded:
                assert array.shards == (int(sharded[0]), y, x)
            else:
                assert array.shards is None
