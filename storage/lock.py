"""An exclusive lock on a store, naming its holder and recovering from dead holders."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from storage.errors import StoreLockedError

__all__ = ["StoreLock"]


class StoreLock:
    """``with StoreLock(root): ...`` guards a store against a second writer.

    The lock file holds ``{"host", "pid", "started"}``. A lock left by a dead process on
    this host is taken over; one held by a live process, or by another host (unless it
    is older than ``stale_after`` seconds), is refused with the holder named.
    """

    FILENAME = ".lock"

    def __init__(self, root: Path, stale_after: float = 0.0) -> None:
        self.path = root / self.FILENAME
        self.stale_after = stale_after
        self.taken_over: dict[str, object] | None = None

    def __enter__(self) -> StoreLock:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._break_if_stale()
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(
                    {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}, fh
                )
            return self
        raise StoreLockedError(self.path, "the lock could not be taken", "retry")

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.path.unlink(missing_ok=True)

    def holder(self) -> dict[str, object]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def _break_if_stale(self) -> None:
        holder = self.holder()
        host, pid, raw_started = holder.get("host"), holder.get("pid"), holder.get("started")
        started = float(raw_started) if isinstance(raw_started, int | float) else 0.0
        age = time.time() - started
        same_host = host == socket.gethostname()
        dead = same_host and isinstance(pid, int) and not _alive(pid)
        expired = not same_host and self.stale_after > 0 and age > self.stale_after
        if not holder or dead or expired:
            self.taken_over = holder
            self.path.unlink(missing_ok=True)
            return
        raise StoreLockedError(
            self.path,
            f"another preprocess run holds this store (host {host}, pid {pid}, "
            f"started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))})",
            "wait for it to finish; if that process is gone, delete the lock file",
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
