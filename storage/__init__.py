"""liverpipe's storage layer: the only code that knows the Zarr slice-store layout.

Public API: :class:`SliceStore` (create/open, cases, case, write_case, manifest,
commit), :class:`CaseReader` for fast 2.5D samples, and the versioned records
:class:`CaseMeta`, :class:`StoreMeta`, :class:`ManifestEntry`; its errors (:class:`StoreError`), the records'
clock (:func:`utc_now`) and the 2.5D window (:func:`window_indices`). See ``docs/store.md``.
"""

from storage.errors import FixableError, StoreError, StoreLockedError, StoreSchemaError
from storage.lock import StoreLock
from storage.manifest import SPLITS, Manifest, ManifestEntry, Split, utc_now
from storage.reader import CaseReader, window_indices
from storage.schema import SCHEMA_VERSION, CaseMeta, Intensity, StoreMeta
from storage.store import SliceStore, StoredCase

__all__ = [
    "SCHEMA_VERSION",
    "SPLITS",
    "CaseMeta",
    "CaseReader",
    "FixableError",
    "Intensity",
    "Manifest",
    "ManifestEntry",
    "SliceStore",
    "Split",
    "StoreError",
    "StoreLock",
    "StoreLockedError",
    "StoreMeta",
    "StoreSchemaError",
    "StoredCase",
    "utc_now",
    "window_indices",
]
