"""``ingest`` (scheduled): new scans in an inbox flow into the store, the models and masks.

The inbox has the dataset layout: ``imagesTr/`` + ``labelsTr/`` for labelled scans and
``imagesTs/`` for unlabelled ones. Inbox files are only read, never moved or rewritten.
The bookkeeping lives in :mod:`liverpipe.ops.inbox`; this flow only orders the steps.

1. New or changed labelled cases are preprocessed into the store on Dask. A tick with
   nothing to preprocess starts no cluster; files whose identity is unchanged are not
   read (``verify`` re-hashes them all).
2. When at least ``[ingest] min_new_cases`` labelled cases have arrived in the inbox since
   the last training, ``train-all`` runs: a new versioned run, evaluated, that becomes
   champion only if it is not worse than the current one.
3. Unlabelled scans not predicted yet (or changed since) are predicted with the
   ensemble champion into OUTPUTS, recorded in ``OUTPUTS/ledger.json``.
4. With ``[ingest] dicomweb_url``, the PACS's new CT series are predicted the same way
   and each DICOM-SEG is stored back into its study (:mod:`liverpipe.ops.pacs`).

A tick with nothing new imports no torch and loads no model.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.preprocess import preprocess
from liverpipe.errors import LiverpipeError
from liverpipe.ops import (
    Ledger,
    begin_tick,
    champion,
    inbox_cases,
    predict_pending,
    to_predict,
    unlabelled_scans,
)
from liverpipe.preprocess import (
    needs_record,
    needs_workers,
    pending,
    preprocess_dataset,
    serial_runner,
)
from liverpipe.settings import Settings, load_settings
from storage import SliceStore

__all__ = ["ingest"]


def _preprocess(
    inbox: str, store: str, config: str | None, settings: Settings, verify: bool, dask: str | None
) -> dict[str, Any] | None:
    """The preprocess subflow when there are cases to preprocess; else, at most, the
    manifest notes (touched or missing files) in this process."""
    if not (Path(inbox) / "imagesTr").is_dir():
        return None
    work = pending(Path(inbox), Path(store), settings, verify)
    entries = SliceStore.open(Path(store)).manifest.entries if work is not None else {}
    if needs_workers(work, entries):
        return preprocess(
            data_dir=inbox, store=store, config=config, dask_address=dask, verify=verify
        )
    assert work is not None
    if needs_record(work, entries):
        return preprocess_dataset(
            Path(inbox), Path(store), settings, serial_runner, verify=verify
        ).to_dict()
    return {"processed": [], "skipped": work.skipped, "failed": {}, "unchanged": True}


def _predict(
    inbox: Path, runs: Path, outputs: Path, settings: Settings, verify: bool
) -> dict[str, Any]:
    logger = get_run_logger()
    ledger = Ledger.load(outputs)
    best = champion(runs)
    todo, touched = to_predict(
        unlabelled_scans(inbox),
        ledger,
        best,
        verify,
        settings.ingest.repredict_on_promotion,
        settings.ingest.trust_ctime,
    )
    if touched and not todo:
        ledger.save(outputs)
    result: dict[str, Any] = {"predicted": [], "failed": {}, "rehashed": touched, "model": best}
    if todo and best is None:
        logger.info("%d unlabelled scan(s) wait for a champion model", len(todo))
        return {**result, "waiting": [p.case_id for p in todo]}
    if not todo:
        return result

    def log(item: Any, outcome: Any) -> None:
        if isinstance(outcome, Exception):
            logger.warning("%s", outcome)
        else:
            logger.info(
                "predicted %s (%s) with %s: %d lesion(s)",
                item.case_id,
                item.reason,
                best,
                outcome["tumour_count"],
            )

    predicted, failed = predict_pending(
        todo, ledger, runs, outputs, settings.ingest.tta, on_scan=log
    )
    return {**result, "predicted": predicted, "failed": failed}


def _pacs(runs: Path, outputs: Path, settings: Settings) -> dict[str, Any]:
    """The PACS step; a PACS that does not answer fails this step, not the tick."""
    from liverpipe.ops import Pacs, PacsError, poll_pacs

    logger = get_run_logger()
    cfg = settings.ingest
    assert cfg.dicomweb_url is not None
    try:
        polled = poll_pacs(
            Pacs(cfg.dicomweb_url, cfg.dicomweb_timeout_s),
            runs,
            outputs,
            tta=cfg.tta,
            repredict=cfg.repredict_on_promotion,
            lookback_days=cfg.dicomweb_lookback_days,
            log=logger.info,
        )
    except PacsError as err:
        logger.warning("%s", err)
        return {"failed": {"pacs": str(err)}}
    return {**polled.to_dict(), "failed": {f"pacs:{k}": v for k, v in polled.failed.items()}}


@flow(name="ingest", log_prints=True)
def ingest(
    inbox: str = "inbox",
    store: str = "stores/liver.zarr",
    runs: str = "runs",
    outputs: str = "outputs",
    config: str | None = None,
    report: str = "report",
    *,
    dask_address: str | None = None,
    verify: bool = False,
) -> dict[str, Any]:
    """Preprocess new labelled scans, retrain after enough new cases, predict new
    unlabelled scans with the champion. ``verify`` re-hashes every inbox file."""
    logger = get_run_logger()
    settings = load_settings(Path(config) if config else None)
    inbox_dir, runs_dir = Path(inbox), Path(runs)
    tick = begin_tick(runs_dir, settings.ingest, verify)
    result: dict[str, Any] = {"tick": tick.ticks, "verified": tick.verify, "trained": False}
    result["preprocess"] = _preprocess(inbox, store, config, settings, tick.verify, dask_address)
    if Path(store).exists():
        stored = inbox_cases(SliceStore.open(Path(store)), inbox_dir)
        new = sorted(stored - set(tick.trained_on))
        result["new_since_training"] = len(new)
        if len(new) >= settings.ingest.min_new_cases:
            from flows.train import train_all_flow  # torch: only when there is training to do

            logger.info("%d new labelled case(s) since the last training: training", len(new))
            result["train"] = train_all_flow(store=store, runs=runs, config=config, report=report)
            tick = replace(tick, trained_on=tuple(sorted(stored)))
            result["trained"] = True
    result["predict"] = _predict(inbox_dir, runs_dir, Path(outputs), settings, tick.verify)
    if settings.ingest.dicomweb_url:
        result["pacs"] = _pacs(runs_dir, Path(outputs), settings)
    tick.save(runs_dir)
    failed = [
        *(result["preprocess"] or {}).get("failed", {}),
        *result["predict"].get("failed", {}),
        *result.get("pacs", {}).get("failed", {}),
    ]
    if failed:  # after everything else was done: the run ends failed, naming the scans
        raise LiverpipeError(
            inbox_dir,
            f"{len(failed)} scan(s) failed in this tick: {', '.join(sorted(failed))}",
            "read the warnings above (or OUTPUTS/ledger.json and the store manifest) for each "
            "file's problem and fix; the other scans were processed",
        )
    return result
