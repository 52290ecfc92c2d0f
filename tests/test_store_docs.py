"""The docs/store.md snippet reads a real store with zarr alone."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
from conftest import REPO

from liverpipe.pipeline import preprocess_dataset, serial_runner
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
