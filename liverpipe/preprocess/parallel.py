"""The one adapter between liverpipe and Dask (distributed). Nothing else imports Dask.

``local_cluster_kwargs`` is the one place that says how a LocalCluster is made (loopback,
one thread per worker process, no dashboard); the CLI's ``dask_map`` and the Prefect
flows' ``dask_task_runner`` both use it.

``dask_map`` runs one task per item on a ``LocalCluster`` (one worker per core, one
thread each) or on an existing scheduler, and yields ``(item, result)`` as tasks finish.
A task that raises (or whose worker died) yields the exception instead of a result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import dask
from distributed import Client, LocalCluster, as_completed

from liverpipe._system import available_cpus

__all__ = ["dask_client", "dask_map", "dask_task_runner", "local_cluster_kwargs"]

T = TypeVar("T")
R = TypeVar("R")

# Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536. glibc then maps every
# large array afresh and faults it in page by page: 150,000 page faults and a quarter of
# the time of a preprocessing task here (docs/benchmarks.md). The workers of liverpipe's
# LocalClusters keep glibc's own thresholds, which reuse freed memory within a case;
# ``ingest_case`` hands it back to the OS after each case.
dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})


def local_cluster_kwargs(workers: int = 0) -> dict[str, Any]:
    """LocalCluster arguments: one single-threaded worker process per core, on 127.0.0.1."""
    return {
        "n_workers": workers or available_cpus(),
        "threads_per_worker": 1,
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": None,
        "silence_logs": logging.ERROR,
    }


def dask_task_runner(workers: int = 0, address: str | None = None) -> Any:
    """prefect-dask's DaskTaskRunner: on ``address``, or on a new loopback LocalCluster."""
    from prefect_dask.task_runners import DaskTaskRunner  # noqa: PLC0415 (Prefect only in flows)

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster", cluster_kwargs=local_cluster_kwargs(workers)
    )


@contextmanager
def dask_client(workers: int = 0, address: str | None = None) -> Iterator[Client]:
    """A client on ``address``, or on a new loopback LocalCluster closed on exit."""
    if address:
        with Client(address, timeout="30s") as client:
            yield client
        return
    with (
        LocalCluster(**local_cluster_kwargs(workers)) as cluster,
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
