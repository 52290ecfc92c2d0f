"""The store manifest: one JSON file listing every case, replaced atomically.

Only the process that holds the store lock writes it. Entries are never deleted: a case
whose source disappeared is flagged ``source_missing``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

from storage.errors import StoreSchemaError

__all__ = ["SPLITS", "Manifest", "ManifestEntry", "Split", "Status", "utc_now"]

Status = Literal["ok", "failed"]
Split = Literal["train", "val", "test"]
#: The splits, in order.
SPLITS: tuple[Split, ...] = get_args(Split)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ManifestEntry:
    """One case's record. ``error`` is set when ``status == "failed"``."""

    case_id: str
    status: Status
    split: Split
    source_sha256: str
    config_hash: str
    image: str
    label: str | None
    created: str
    updated: str
    error: str | None = None
    source_missing: bool = False
    shape: tuple[int, int, int] | None = None
    warnings: tuple[str, ...] = ()
    #: A failure of the input itself: not retried until the source hash or config changes.
    permanent: bool = False
    #: ``{"image": [size, mtime_ns, inode, ctime_ns], "label": [...]}`` when last hashed.
    identity: dict[str, list[int]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ManifestEntry:
        shape = data.get("shape")
        warnings = tuple(data.get("warnings", ()))
        return cls(**{**data, "shape": tuple(shape) if shape else None, "warnings": warnings})


class Manifest:
    """In-memory view of ``manifest.json``; ``save`` writes it atomically."""

    FILENAME = "manifest.json"

    def __init__(self, path: Path, entries: dict[str, ManifestEntry] | None = None) -> None:
        self.path = path
        self.entries: dict[str, ManifestEntry] = dict(entries or {})

    @classmethod
    def load(cls, root: Path) -> Manifest:
        path = root / cls.FILENAME
        if not path.exists():
            return cls(path)
        try:
            raw = json.loads(path.read_text())
            entries = {e["case_id"]: ManifestEntry.from_dict(e) for e in raw["cases"]}
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise StoreSchemaError(
                path,
                f"the manifest cannot be parsed ({err!r})",
                "restore it from a backup or preprocess into a new --store path",
            ) from err
        return cls(path, entries)

    def save(self) -> None:
        payload = {"cases": [self.entries[k].to_dict() for k in sorted(self.entries)]}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with tmp.open("w") as fh:
            json.dump(payload, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def upsert(self, entry: ManifestEntry) -> None:
        old = self.entries.get(entry.case_id)
        self.entries[entry.case_id] = replace(entry, created=old.created) if old else entry

    def ok(self, config_hash: str) -> list[ManifestEntry]:
        """Cases that are stored and current for ``config_hash``, sorted by id."""
        return [
            e
            for _, e in sorted(self.entries.items())
            if e.status == "ok" and e.config_hash == config_hash
        ]
