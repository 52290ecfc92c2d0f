"""``preprocess``: bring the slice store up to date with a dataset folder, on Dask.

One Prefect task per case (``liverpipe.preprocess.case.ingest_case`` on a Dask worker); the
store's content-hash manifest decides what is new or changed, so reruns only process
new scans. A table artifact lists processed, skipped and failed cases with reasons.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.futures import as_completed

from liverpipe.preprocess import RunSummary, dask_task_runner, preprocess_dataset
from liverpipe.settings import load_settings

__all__ = ["preprocess", "summary_table"]


@task(name="case", task_run_name="{key}", retries=1, retry_delay_seconds=5)
def run_case(fn: Callable[[Any], Any], item: Any, key: str) -> Any:
    """One volume: validate, resample, normalise and write it (or its statistics)."""
    return fn(item)


def prefect_runner(
    fn: Callable[[Any], Any], items: Sequence[Any], keys: Sequence[str]
) -> Iterator[tuple[Any, Any]]:
    """liverpipe's runner protocol on the flow's task runner: one task per item."""
    futures = {run_case.submit(fn, item, key): item for item, key in zip(items, keys, strict=True)}
    for future in as_completed(list(futures)):
        try:
            yield futures[future], future.result()
        except Exception as err:  # a crashed worker: that case fails, the others go on
            yield futures[future], err


def summary_table(summary: RunSummary) -> list[dict[str, str]]:
    """Rows for the artifact: every case touched by the run, with its outcome."""
    rows = [{"case": c, "outcome": "processed", "reason": ""} for c in summary.processed]
    rows += [{"case": c, "outcome": "skipped", "reason": "unchanged"} for c in summary.skipped]
    rows += [{"case": c, "outcome": "failed", "reason": e} for c, e in summary.failed.items()]
    rows += [
        {"case": c, "outcome": "failed (unchanged, not retried)", "reason": e}
        for c, e in summary.still_failed.items()
    ]
    rows += [
        {"case": c, "outcome": "warning", "reason": " ".join(w)}
        for c, w in summary.warnings.items()
    ]
    rows += [
        {"case": c, "outcome": "kept", "reason": "source missing; the stored copy is kept"}
        for c in summary.missing
    ]
    return rows


@flow(name="preprocess-cases")
def _preprocess_cases(
    data_dir: str, store: str, config: str | None, verify: bool = False
) -> dict[str, Any]:
    settings = load_settings(Path(config) if config else None)
    summary = preprocess_dataset(
        Path(data_dir), Path(store), settings, prefect_runner, verify=verify
    )
    create_table_artifact(
        summary_table(summary),
        key="preprocess-cases",
        description=f"{data_dir} -> {store}: processed {len(summary.processed)}, "
        f"skipped {len(summary.skipped)}, failed {len(summary.failed)}",
    )
    return summary.to_dict()


@flow(name="preprocess", log_prints=True)
def preprocess(
    data_dir: str,
    store: str = "stores/liver.zarr",
    config: str | None = None,
    dask_address: str | None = None,
    workers: int = 0,
    verify: bool = False,
) -> dict[str, Any]:
    """Preprocess new or changed cases of DATA_DIR (MSD layout) into the slice store.

    Runs on a Dask LocalCluster (``workers`` processes, 0 = one per core) or on the
    scheduler at ``dask_address``. Failed cases are listed with the fix; the others go on.
    Files whose identity (size, mtime, inode, ctime) is unchanged are not re-read;
    ``verify`` re-hashes every file.
    """
    settings = load_settings(Path(config) if config else None)
    address = dask_address or settings.store.dask_address
    runner = dask_task_runner(workers or settings.store.workers, address)
    result = _preprocess_cases.with_options(task_runner=runner)(data_dir, store, config, verify)
    logger = get_run_logger()
    logger.info(
        "processed %d, skipped %d, failed %d in %.1f s",
        len(result["processed"]),
        len(result["skipped"]),
        len(result["failed"]),
        result["seconds"],
    )
    for case_id, error in result["failed"].items():
        logger.warning("%s failed: %s", case_id, error)
    for case_id, error in result["still_failed_unchanged"].items():
        logger.warning("%s still fails (its files are unchanged): %s", case_id, error)
    for case_id, warnings in result["warnings"].items():
        for warning in warnings:
            logger.warning("%s: %s", case_id, warning)
    return result
