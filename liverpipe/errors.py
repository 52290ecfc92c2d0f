"""Exception hierarchy. Every message names the file, what is wrong and how to fix it."""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "ConfigError",
    "DatasetLayoutError",
    "GeometryMismatchError",
    "InvalidScanError",
    "LabelValueError",
    "LiverpipeError",
    "StoreSchemaError",
]


class LiverpipeError(Exception):
    """Base class of every error liverpipe raises on purpose.

    ``str(err)`` reads ``"<path>: <problem>. Fix: <fix>"`` so that a log line alone
    tells the user what to do.
    """

    def __init__(self, path: Path | str | None, problem: str, fix: str) -> None:
        self.path = Path(path) if path is not None else None
        self.problem = problem.rstrip(".")
        self.fix = fix.rstrip(".")
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{where}{self.problem}. Fix: {self.fix}.")


class InvalidScanError(LiverpipeError):
    """A NIfTI file that cannot be used as a CT scan (header, data or encoding)."""


class LabelValueError(LiverpipeError):
    """A label volume with values outside {0, 1, 2} or non-integral values."""


class GeometryMismatchError(LiverpipeError):
    """Image and label (or a prediction and its scan) do not share one voxel grid."""


class DatasetLayoutError(LiverpipeError):
    """A data folder that does not follow the imagesTr/labelsTr (MSD) layout."""


class ConfigError(LiverpipeError):
    """A configuration file or value that cannot be used."""


class StoreSchemaError(LiverpipeError):
    """A slice store whose layout or schema version this liverpipe cannot read."""
