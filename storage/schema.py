"""The slice store's versioned metadata: what every case and the store itself record.

``StoreMeta`` lives in the root group's attributes under ``"liverpipe"``; ``CaseMeta``
in each case group's attributes. Both round-trip through JSON with ``to_dict`` /
``from_dict``, which validate. See ``docs/store.md``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from storage.errors import StoreSchemaError

__all__ = ["FORMAT", "SCHEMA_VERSION", "CaseMeta", "Intensity", "StoreMeta"]

#: Bump on any change to the layout or to these records; older stores are refused.
SCHEMA_VERSION = 1
FORMAT = "liverpipe-slice-store"

_AXES = 3  # spatial axes of a shape, spacing or origin


def _matrix(value: Any, name: str) -> tuple[tuple[float, ...], ...]:
    array = np.asarray(value, dtype=np.float64)
    if array.shape != (4, 4) or not np.isfinite(array).all():
        raise ValueError(f"{name} must be a finite 4x4 matrix")
    return tuple(tuple(float(v) for v in row) for row in array)


@dataclass(frozen=True)
class Intensity:
    """How stored image values map back to normalised values and to HU.

    ``normalised = stored * stored_scale + stored_offset`` and, for
    ``normalization == "window"``, ``hu = normalised * hu_scale + hu_offset`` (within the
    window; values outside it were clipped). For ``"zscore"`` the same formula gives
    HU before percentile clipping.
    """

    normalization: str
    dtype: str
    stored_scale: float
    stored_offset: float
    hu_scale: float
    hu_offset: float


@dataclass(frozen=True)
class CaseMeta:
    """Everything recorded with one stored case (arrays are (Z, Y, X))."""

    case_id: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # (x, y, z) mm
    affine: tuple[tuple[float, ...], ...]  # (x, y, z) indices of array[z, y, x] -> RAS+ mm
    original_shape: tuple[int, int, int]  # the source file's (i, j, k) shape
    original_affine: tuple[tuple[float, ...], ...]  # the source file's (i, j, k) -> RAS+ mm
    crop_offset: tuple[int, int, int]  # (z, y, x) of stored voxel 0 on the uncropped resampled grid
    source_sha256: str
    config_hash: str
    slice_counts: dict[
        str, list[int]
    ]  # {"liver": [...], "tumour": [...]} voxels of label 1 / 2 per slice
    hu_stats: dict[str, float]
    intensity: Intensity
    source_image: str
    source_label: str | None = None
    #: Which header transform gave ``original_affine``: "sform", "qform" or "pixdim" (a guess).
    affine_source: str = "sform"
    #: In-plane coverage of the crop: body_outside, label_outside, needed_slice_size.
    fov: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaseMeta:
        try:
            meta = cls(
                case_id=str(data["case_id"]),
                shape=_ints3(data["shape"]),
                spacing=tuple(float(v) for v in data["spacing"]),  # type: ignore[arg-type]
                affine=_matrix(data["affine"], "affine"),
                original_shape=_ints3(data["original_shape"]),
                original_affine=_matrix(data["original_affine"], "original_affine"),
                crop_offset=_ints3(data["crop_offset"]),
                source_sha256=str(data["source_sha256"]),
                config_hash=str(data["config_hash"]),
                slice_counts={k: [int(v) for v in vs] for k, vs in data["slice_counts"].items()},
                hu_stats={k: float(v) for k, v in data["hu_stats"].items()},
                intensity=Intensity(**data["intensity"]),
                source_image=str(data["source_image"]),
                source_label=data.get("source_label"),
                affine_source=str(data.get("affine_source", "sform")),
                fov=dict(data.get("fov", {})),
                extra=dict(data.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise StoreSchemaError(
                None,
                f"case metadata is incomplete or invalid ({err!r})",
                "reprocess the case with `liverpipe preprocess`",
            ) from err
        if len(meta.spacing) != _AXES or min(meta.spacing) <= 0:
            raise StoreSchemaError(None, f"case {meta.case_id} has invalid spacing", "reprocess it")
        return meta

    @property
    def affine_array(self) -> np.ndarray:
        return np.array(self.affine, dtype=np.float64)


def _ints3(value: Any) -> tuple[int, int, int]:
    items = tuple(int(v) for v in value)
    if len(items) != _AXES:
        raise ValueError(f"expected {_AXES} integers, got {value!r}")
    return items  # type: ignore[return-value]


@dataclass(frozen=True)
class StoreMeta:
    """Store-level record: schema version and the preprocessing config of its cases."""

    schema_version: int
    config_hash: str
    config: dict[str, Any]
    created: str
    liverpipe_version: str
    format: str = FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> StoreMeta:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise StoreSchemaError(
                where,
                "this is not a liverpipe slice store (no 'liverpipe' record in its zarr.json)",
                "point --store at a store made by `liverpipe preprocess`, or at a new path",
            )
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreSchemaError(
                where,
                f"the store has schema version {version}; this liverpipe reads version {SCHEMA_VERSION}",
                "preprocess into a new --store path (or delete this store and rerun)",
            )
        return cls(
            schema_version=int(version),
            config_hash=str(data["config_hash"]),
            config=dict(data["config"]),
            created=str(data["created"]),
            liverpipe_version=str(data["liverpipe_version"]),
        )
