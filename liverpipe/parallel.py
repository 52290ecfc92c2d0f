"""The one adapter between liverpipe and Dask (distributed). Nothing else imports Dask.

``dask_map`` runs one task per item on a ``LocalCluster`` (one worker per core, one
thread each) or on an existing scheduler, and yields ``(item, result)`` as tasks finish.
A task that raises (or whose worker died) yields the exception instead of a result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

from distributed import Client, LocalCluster, as_completed

from liverpipe._system import available_cpus

__all__ = ["dask_client", "dask_map"]

T = TypeVar("T")
R = TypeVar("R")


@contextmanager
def dask_client(workers: int = 0, address: str | None = None) -> Iterator[Client]:
    """A client on ``address``, or on a new loopback LocalCluster closed on exit."""
    if address:
        with Client(address, timeout="30s") as client:
            yield client
        return
    with (
        LocalCluster(
            n_workers=workers or available_cpus(),
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def dask_map(
    fn: Callable[[T], R],
    items: Sequence[T],
    keys: Sequence[str],
    workers: int = 0,
    address: str | None = None,
) -> Iterator[tuple[T, R | BaseException]]:
    """Run ``fn`` on every item, one task each; yield in completion order."""
    if not items:
        return
    with dask_client(workers, address) as client:
        futures = client.map(fn, items, key=list(keys), pure=False, retries=0)
        by_key = dict(zip((f.key for f in futures), items, strict=True))
        for future in as_completed(futures):
            item = by_key[future.key]
            try:
                yield item, future.result()
            except Exception as err:  # KilledWorker, CancelledError, a bug in fn
                yield item, err
