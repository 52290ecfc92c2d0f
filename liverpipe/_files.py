"""JSON files: atomic writes (a reader sees the old file or the new one, never a torn
one), and the one rule for NaN in them: written as null, read back as NaN."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["file_in_the_way", "nan_if_null", "read_json", "strict_json", "write_json_atomic"]


def file_in_the_way(folder: Path) -> Path | None:
    """The existing file that ``folder`` is, or lies below, so that the folder cannot be
    made; None when the folder exists or can be created."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


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


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (an undefined score: NaN) as None, in nested
    dicts, lists and tuples, so that it can be written as strict JSON."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def nan_if_null(value: Any) -> float:
    """A score read back from JSON: null (undefined) is NaN."""
    return math.nan if value is None else float(value)
