"""Atomic JSON files: a reader sees the old file or the new one, never a torn one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["read_json", "write_json_atomic"]


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it over
    ``path`` and fsync the folder: a ``kill -9`` at any moment leaves the old or the new
    file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as fh:
        json.dump(data, fh, indent=1, allow_nan=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def read_json(path: Path, default: Any) -> Any:
    """The parsed file, or ``default`` when it does not exist."""
    return json.loads(path.read_text()) if path.is_file() else default
