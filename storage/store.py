"""``SliceStore``: the Zarr v3 slice store. The only code that builds store paths.

Layout (``docs/store.md``)::

    STORE/zarr.json             root group; attributes["liverpipe"] = StoreMeta
    STORE/manifest.json         every case: status, hashes, split (storage.manifest)
    STORE/.lock                 held by the preprocess run writing the store
    STORE/cases/<id>/zarr.json  case group; attributes["liverpipe"] = CaseMeta
    STORE/cases/<id>/image      (Z, Y, X) float16 or uint8
    STORE/cases/<id>/label      (Z, Y, X) uint8

A case is written under ``cases/.tmp-<id>-<token>`` and renamed into place when
complete, then committed to the manifest by the lock holder; readers only see cases
the manifest lists as ok for the store's current config.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from storage.errors import StoreSchemaError
from storage.layout import array_options
from storage.lock import StoreLock
from storage.manifest import Manifest, ManifestEntry, utc_now
from storage.schema import SCHEMA_VERSION, CaseMeta, StoreMeta

__all__ = ["SliceStore", "StoredCase"]

_META_KEY = "liverpipe"
_CASES = "cases"
_TMP, _TRASH = ".tmp-", ".trash-"


@dataclass(frozen=True, eq=False)
class StoredCase:
    """One case: its metadata and lazily read (Z, Y, X) Zarr arrays."""

    meta: CaseMeta
    image: zarr.Array[Any]
    label: zarr.Array[Any]

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """Read both arrays whole (the fast path: one call per array)."""
        return np.asarray(self.image[:]), np.asarray(self.label[:])


class SliceStore:
    """A liverpipe slice store on a local (or shared) filesystem path."""

    def __init__(self, root: Path, meta: StoreMeta) -> None:
        self.root = Path(root)
        self.meta = meta
        self._manifest: Manifest | None = None

    # -- opening -----------------------------------------------------------------
    @classmethod
    def create(
        cls, root: Path, config_hash: str, config: dict[str, Any], version: str
    ) -> SliceStore:
        """Create an empty store; refuses a path that already holds anything, or that is
        (or lies below) a file."""
        root = Path(root)
        blocker = next((p for p in (root, *root.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise StoreSchemaError(
                blocker,
                f"this is a file, so {root} cannot be a store folder",
                "choose a --store path that is a folder or does not exist yet",
            )
        if root.exists() and any(root.iterdir()):
            raise StoreSchemaError(
                root,
                "the folder exists and is not empty",
                "choose a new --store path or open the existing store",
            )
        meta = StoreMeta(SCHEMA_VERSION, config_hash, config, utc_now(), version)
        group = zarr.open_group(str(root), mode="w", zarr_format=3)
        group.attrs[_META_KEY] = meta.to_dict()
        group.create_group(_CASES)
        store = cls(root, meta)
        store.manifest.save()
        return store

    @classmethod
    def open(cls, root: Path) -> SliceStore:
        """Open an existing store; refuses other schema versions and non-stores."""
        root = Path(root)
        if not (root / "zarr.json").is_file():
            raise StoreSchemaError(
                root,
                "no slice store here (zarr.json is missing)",
                "run `liverpipe preprocess DATA --store PATH` first",
            )
        attrs = zarr.open_group(str(root), mode="r").attrs.asdict()
        record = attrs.get(_META_KEY, {})
        return cls(root, StoreMeta.from_dict(record if isinstance(record, dict) else {}, str(root)))

    @classmethod
    def open_or_create(
        cls, root: Path, config_hash: str, config: dict[str, Any], version: str
    ) -> SliceStore:
        if (Path(root) / "zarr.json").is_file():
            return cls.open(root)
        return cls.create(root, config_hash, config, version)

    def set_config(self, config_hash: str, config: dict[str, Any]) -> None:
        """Adopt a new preprocessing config; cases made with the old one stop being served."""
        self.meta = replace(self.meta, config_hash=config_hash, config=config)
        zarr.open_group(str(self.root), mode="r+").attrs[_META_KEY] = self.meta.to_dict()

    def lock(self, stale_after: float = 0.0) -> StoreLock:
        return StoreLock(self.root, stale_after)

    # -- manifest ----------------------------------------------------------------
    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            self._manifest = Manifest.load(self.root)
        return self._manifest

    def reload(self) -> None:
        self._manifest = None

    def commit(self, entry: ManifestEntry) -> None:
        """Record a case in the manifest and save it atomically (lock holder only)."""
        self.manifest.upsert(entry)
        self.manifest.save()

    # -- cases -------------------------------------------------------------------
    def cases(self, split: str | None = None) -> list[str]:
        """Ids of cases stored with the current config (optionally of one split)."""
        return [
            e.case_id
            for e in self.manifest.ok(self.meta.config_hash)
            if split is None or e.split == split
        ]

    def case(self, case_id: str) -> StoredCase:
        """Arrays and metadata of one committed case."""
        entry = self.manifest.entries.get(case_id)
        if entry is None or entry.status != "ok":
            state = "not in the manifest" if entry is None else f"{entry.status}: {entry.error}"
            raise KeyError(f"case {case_id!r} is not available ({state})")
        group = zarr.open_group(str(self._case_path(case_id)), mode="r")
        meta = CaseMeta.from_dict(group.attrs[_META_KEY])  # type: ignore[arg-type]
        return StoredCase(meta, group["image"], group["label"])  # type: ignore[arg-type]

    def write_case(self, meta: CaseMeta, image: np.ndarray, label: np.ndarray) -> Path:
        """Write a case's arrays and metadata, then move it into place atomically.

        Safe to call from several processes at once for different cases: each case is
        its own set of files, so no two writers share a shard.
        """
        if image.shape != meta.shape or label.shape != meta.shape:
            raise ValueError(
                f"arrays {image.shape}/{label.shape} do not match meta shape {meta.shape}"
            )
        token = uuid.uuid4().hex[:12]
        tmp = self.root / _CASES / f"{_TMP}{meta.case_id}-{token}"
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        group.attrs[_META_KEY] = _jsonable(meta.to_dict())
        group.create_array("image", data=image, **array_options(meta.shape))
        group.create_array(
            "label", data=label.astype(np.uint8, copy=False), **array_options(meta.shape)
        )
        final = self._case_path(meta.case_id)
        if final.exists():
            trash = final.with_name(f"{_TRASH}{meta.case_id}-{token}")
            final.rename(trash)
            tmp.rename(final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(final)
        return final

    def recover(self) -> list[str]:
        """Remove half-written cases left by a killed run; restore an interrupted swap.

        Call with the lock held. Returns what was cleaned, for the run summary.
        """
        cleaned = []
        for path in sorted((self.root / _CASES).glob(f"{_TRASH}*")):
            case_id = path.name[len(_TRASH) :].rsplit("-", 1)[0]
            if not self._case_path(case_id).exists():
                path.rename(self._case_path(case_id))
            else:
                shutil.rmtree(path, ignore_errors=True)
            cleaned.append(path.name)
        for path in sorted((self.root / _CASES).glob(f"{_TMP}*")):
            shutil.rmtree(path, ignore_errors=True)
            cleaned.append(path.name)
        return cleaned

    def _case_path(self, case_id: str) -> Path:
        if not case_id or "/" in case_id or case_id.startswith("."):
            raise ValueError(f"invalid case id {case_id!r}")
        return self.root / _CASES / case_id

    def info(self) -> dict[str, Any]:
        """The store summary printed by ``liverpipe store info --json``."""
        cases = []
        for entry in sorted(self.manifest.entries.values(), key=lambda e: e.case_id):
            spacing = None
            if entry.status == "ok":
                spacing = list(self.case(entry.case_id).meta.spacing)
            cases.append(
                {
                    "case_id": entry.case_id,
                    "status": entry.status
                    if entry.config_hash == self.meta.config_hash
                    else "stale",
                    "split": entry.split,
                    "shape": list(entry.shape) if entry.shape else None,
                    "spacing": spacing,
                    "source_sha256": entry.source_sha256,
                    "error": entry.error,
                    "source_missing": entry.source_missing,
                }
            )
        return {
            "schema_version": self.meta.schema_version,
            "config_hash": self.meta.config_hash,
            "cases": cases,
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
