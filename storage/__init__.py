"""liverpipe's storage layer: the only code that knows the Zarr slice-store layout.

Public API: :class:`SliceStore` (create/open, cases, case, write_case, manifest,
commit), :class:`CaseReader` for fast 2.5D samples, and the versioned records
:class:`CaseMeta`, :class:`StoreMeta`, :class:`ManifestEntry`. See ``docs/store.md``.
"""

from storage.lock import StoreLock, StoreLockedError
from storage.manifest import Manifest, ManifestEntry
from storage.reader import CaseReader
from storage.schema import SCHEMA_VERSION, CaseMeta, Intensity, StoreMeta
from storage.store import SliceStore, StoredCase

__all__ = [
    "SCHEMA_VERSION",
    "CaseMeta",
    "CaseReader",
    "Intensity",
    "Manifest",
    "ManifestEntry",
    "SliceStore",
    "StoreLock",
    "StoreLockedError",
    "StoreMeta",
    "StoredCase",
]
