"""The store's errors. liverpipe's own errors share their base and re-export them
(``liverpipe.errors``), so one ``except FixableError`` catches every error either raises
on purpose, and ``storage`` still imports nothing from liverpipe."""

from __future__ import annotations

from pathlib import Path

__all__ = ["FixableError", "StoreError", "StoreLockedError", "StoreSchemaError"]


class FixableError(Exception):
    """An error raised on purpose, whose text says where, what and how to fix it.

    ``str(err)`` reads ``"<path>: <problem>. Fix: <fix>"`` so that a log line alone
    tells the user what to do.
    """

    def __init__(self, path: Path | str | None, problem: str, fix: str) -> None:
        self.path = Path(path) if path is not None else None
        self.problem = problem.rstrip(".")
        self.fix = fix.rstrip(".")
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{where}{self.problem}. Fix: {self.fix}.")


class StoreError(FixableError):
    """Base class of the slice store's errors."""


class StoreSchemaError(StoreError):
    """A slice store whose layout or schema version this liverpipe cannot read."""


class StoreLockedError(StoreError):
    """Another live process holds the store lock."""
