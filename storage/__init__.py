"""liverpipe's storage layer: the only code that knows the Zarr slice-store layout.

The slice store (schema, manifest, atomic case commits, training readers) is specified
in ``../shared/DESIGN.md`` ("Slice store contract") and documented in ``docs/store.md``
once it lands. Nothing outside this package builds Zarr paths.
"""

__all__: list[str] = []
