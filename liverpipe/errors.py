"""Exception hierarchy. Every message names the file, what is wrong and how to fix it."""

from __future__ import annotations

from storage import FixableError, StoreError, StoreLockedError, StoreSchemaError

__all__ = [
    "ConfigError",
    "DatasetLayoutError",
    "FixableError",
    "GeometryMismatchError",
    "InvalidScanError",
    "LabelValueError",
    "LiverpipeError",
    "StoreError",
    "StoreLockedError",
    "StoreSchemaError",
]


class LiverpipeError(FixableError):
    """Base class of every error liverpipe raises on purpose (the store's errors,
    :class:`StoreError`, share the base :class:`FixableError`)."""


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
