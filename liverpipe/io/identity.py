"""File identity: what ``stat`` says about a file, checked before its content is read.

A scheduled tick over a large archive cannot hash every file. Like git's index and make,
liverpipe trusts a file whose ``(size, mtime_ns, inode, ctime_ns)`` is unchanged and reads
(hashes) only the others; a changed identity with an unchanged hash costs a hash and no
work.

The trade-off, the one git and make accept: a rewrite that keeps the size, the mtime and
the inode goes unnoticed until a ``--verify`` run re-hashes everything. With
``trust_ctime`` (git's ``core.trustctime``, the default) such an in-place rewrite still
changes the ctime and is caught; turn it off on file systems whose ctime moves without
a content change (some network shares and backup tools), and the rewrite is found only
by ``--verify``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FileIdentity", "case_identity", "folder_identity", "unchanged"]


@dataclass(frozen=True)
class FileIdentity:
    """A file's size, modification time, inode and status-change time, from ``stat``."""

    size: int
    mtime_ns: int
    inode: int
    ctime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity:
        st = os.stat(path)
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)

    def to_list(self) -> list[int]:
        return [self.size, self.mtime_ns, self.inode, self.ctime_ns]


def folder_identity(folder: Path) -> list[int]:
    """The identity of a folder of files (a DICOM series): total size, newest mtime, the
    folder's inode, newest ctime and the number of files, from a ``stat`` of each file."""
    stats = [p.stat() for p in sorted(Path(folder).rglob("*")) if p.is_file()]
    return [
        sum(st.st_size for st in stats),
        max((st.st_mtime_ns for st in stats), default=0),
        os.stat(folder).st_ino,
        max((st.st_ctime_ns for st in stats), default=0),
        len(stats),
    ]


def case_identity(image: Path, label: Path | None) -> dict[str, list[int]]:
    """The identities of a case's files, as the manifest and the ledger record them."""
    out = {"image": FileIdentity.of(image).to_list()}
    if label is not None:
        out["label"] = FileIdentity.of(label).to_list()
    return out


def unchanged(
    recorded: Mapping[str, list[int]] | None,
    current: Mapping[str, list[int]],
    trust_ctime: bool = True,
) -> bool:
    """Whether every file of ``current`` has the identity ``recorded`` for it (the ctime
    only counts with ``trust_ctime``)."""
    if not recorded or set(recorded) != set(current):
        return False

    def kept(identity: list[int]) -> list[int]:  # the ctime is the fourth value
        return list(identity) if trust_ctime else [*identity[:3], *identity[4:]]

    return all(kept(recorded[k]) == kept(current[k]) for k in current)
