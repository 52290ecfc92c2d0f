"""Checkpoints: saved atomically, loaded safely (``weights_only=True``), foreign ones refused."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from liverpipe.errors import LiverpipeError

__all__ = ["CheckpointMismatchError", "load_checkpoint", "save_checkpoint"]


class CheckpointMismatchError(LiverpipeError):
    """A checkpoint made for another model config or another store config."""


def load_checkpoint(path: Path, expected: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); refuse a foreign one."""
    if not path.is_file():
        raise LiverpipeError(
            path,
            "no checkpoint here",
            "train the model first, or pass the run folder that has last.pt",
        )
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    if expected is not None and state.get("identity") != expected:
        theirs = state.get("identity", {})
        diff = sorted(
            k
            for k in set(theirs.get("train", {})) | set(expected["train"])
            if theirs.get("train", {}).get(k) != expected["train"].get(k)
        )
        if theirs.get("store_config_hash") != expected["store_config_hash"]:
            diff.append("store config (preprocessing)")
        raise CheckpointMismatchError(
            path,
            f"this checkpoint was made with a different configuration ({', '.join(diff)})",
            "resume with the config and store the run was started with, or train into a new --out folder",
        )
    return state


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` beside ``path`` and rename it into place (never a torn file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
