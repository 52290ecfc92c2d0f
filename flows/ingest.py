"""``ingest`` (scheduled): new scans in an inbox flow into the store, the models and masks.

The inbox has the dataset layout: ``imagesTr/`` + ``labelsTr/`` for labelled scans and
``imagesTs/`` for unlabelled ones. Inbox files are only read, never moved or rewritten.

1. New or changed labelled cases are preprocessed into the store (manifest-incremental).
2. When at least ``[ingest] min_new_cases`` labelled cases have arrived in the inbox since
   the last training, ``train-all`` runs (train, evaluate, report). Cases stored from
   elsewhere (a preprocess run by hand) do not count.
3. Unlabelled scans not predicted yet (or changed since) are predicted with the current
   best run into OUTPUTS (mask + measurements), recorded in ``OUTPUTS/ledger.json``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.preprocess import preprocess
from flows.train import train_all_flow
from liverpipe.errors import LiverpipeError
from liverpipe.models import pick_device
from liverpipe.nifti import case_id_of, file_sha256, is_nifti
from liverpipe.predict import Predictor, load_cascade, predict_file
from liverpipe.settings import load_settings
from liverpipe.train_all import read_result
from storage import SliceStore

__all__ = ["best_run", "ingest"]

STATE = "ingest_state.json"  # in RUNS: the cases the current models were trained on


def best_run(runs_dir: Path) -> Path | None:
    """The finished model folder (RUNS/<model>) whose last stage scored best on validation:
    its tumour stage when it has one, else its liver stage."""
    scored = []
    for model in sorted(p for p in runs_dir.glob("*") if (p / "liver" / "result.json").is_file()):
        stage = (
            model / "tumour" if (model / "tumour" / "result.json").is_file() else model / "liver"
        )
        try:
            score = read_result(stage).best_score
        except (LiverpipeError, ValueError, KeyError):
            continue
        scored.append((-math.inf if math.isnan(score) else score, model))
    return max(scored)[1] if scored else None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _read_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


def _predict_new(inbox: Path, runs: Path, outputs: Path, tta: bool) -> dict[str, Any]:
    logger = get_run_logger()
    scans = (
        sorted(p for p in (inbox / "imagesTs").glob("*") if is_nifti(p))
        if (inbox / "imagesTs").is_dir()
        else []
    )
    if not scans:
        return {"predicted": [], "waiting": []}
    ledger_path = outputs / "ledger.json"
    ledger = _read_json(ledger_path, {})
    todo = []
    for scan in scans:
        digest = file_sha256(scan)
        if ledger.get(case_id_of(scan), {}).get("sha256") != digest:
            todo.append((scan, digest))  # new, changed, or failed on other bytes before
    run = best_run(runs)
    if todo and run is None:
        logger.info("%d unlabelled scan(s) wait for a trained model", len(todo))
        return {"predicted": [], "waiting": [s.name for s, _ in todo]}
    predicted, failed = [], {}
    if todo:
        assert run is not None
        device = pick_device()
        predictor = Predictor([load_cascade(run, device)], device, tta)
        outputs.mkdir(parents=True, exist_ok=True)
        for scan, digest in todo:
            case_id = case_id_of(scan)
            try:
                record = predict_file(predictor, scan, outputs / f"{case_id}.nii.gz")
            except Exception as err:  # this scan fails; the others go on
                failed[case_id] = str(err)
                logger.warning("%s", err)
                # Recorded with its hash: the same bytes are not retried every tick.
                ledger[case_id] = {"sha256": digest, "error": str(err), "model": str(run)}
                _write_json(ledger_path, ledger)
                continue
            ledger[case_id] = {"sha256": digest, "mask": record["mask"], "model": str(run)}
            _write_json(ledger_path, ledger)  # after each scan: a killed run loses nothing
            predicted.append(case_id)
            logger.info(
                "predicted %s with %s: %d lesion(s)", case_id, run.name, record["tumour_count"]
            )
    return {"predicted": predicted, "failed": failed, "model": str(run) if run else None}


def _inbox_cases(store: SliceStore, inbox: Path) -> set[str]:
    """Stored cases whose scan came from the inbox: cases preprocessed from elsewhere (a
    dataset run by hand, or `make demo`) never trigger a retraining here."""
    root = inbox.resolve()
    return {
        case_id
        for case_id in store.cases()
        if Path(store.manifest.entries[case_id].image).resolve().is_relative_to(root)
    }


@flow(name="ingest", log_prints=True)
def ingest(
    inbox: str = "inbox",
    store: str = "stores/liver.zarr",
    runs: str = "runs",
    outputs: str = "outputs",
    config: str | None = None,
    report: str = "report",
    dask_address: str | None = None,
) -> dict[str, Any]:
    """Preprocess new labelled scans, retrain after enough new cases, predict new unlabelled scans."""
    logger = get_run_logger()
    settings = load_settings(Path(config) if config else None)
    inbox_dir, runs_dir = Path(inbox), Path(runs)
    result: dict[str, Any] = {"preprocess": None, "trained": False}
    if (inbox_dir / "imagesTr").is_dir():
        result["preprocess"] = preprocess(
            data_dir=inbox, store=store, config=config, dask_address=dask_address
        )
    if Path(store).exists():
        stored = _inbox_cases(SliceStore.open(Path(store)), inbox_dir)
        state = _read_json(runs_dir / STATE, {"trained_on": []})
        new = sorted(stored - set(state["trained_on"]))
        result["new_since_training"] = len(new)
        if len(new) >= settings.ingest.min_new_cases:
            logger.info("%d new labelled case(s) since the last training: training", len(new))
            train_all_flow(store=store, runs=runs, config=config, report=report)
            runs_dir.mkdir(parents=True, exist_ok=True)
            _write_json(runs_dir / STATE, {"trained_on": sorted(stored)})
            result["trained"] = True
    result["predict"] = _predict_new(inbox_dir, runs_dir, Path(outputs), settings.ingest.tta)
    failed = [
        *(result["preprocess"] or {}).get("failed", {}),
        *result["predict"].get("failed", {}),
    ]
    if failed:  # after everything else was done: the run ends failed, naming the scans
        raise LiverpipeError(
            inbox_dir,
            f"{len(failed)} scan(s) failed in this tick: {', '.join(sorted(failed))}",
            "read the warnings above (or OUTPUTS/ledger.json and the store manifest) for each "
            "file's problem and fix; the other scans were processed",
        )
    return result
