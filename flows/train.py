"""``train-all``: train the three models, then evaluate them and publish the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.evaluate import evaluate_runs
from liverpipe.errors import LiverpipeError
from liverpipe.settings import load_settings
from liverpipe.train_all import ModelOutcome, parse_gpus, train_all

__all__ = ["train_all_flow"]


@flow(name="train-all", log_prints=True)
def train_all_flow(
    store: str = "stores/liver.zarr",
    runs: str = "runs",
    config: str | None = None,
    steps: int | None = None,
    gpus: str = "auto",
    report: str = "report",
    resume: bool = False,
) -> dict[str, Any]:
    """Train both stages (liver, tumour) of UnetPlusPlus, MAnet and DeepLabV3Plus (one job
    per GPU when there are several), then evaluate every cascade, stage 1 alone and the
    ensemble into REPORT."""
    logger = get_run_logger()
    settings = load_settings(
        Path(config) if config else None, {"train": {"steps": steps}, "tumour": {"steps": steps}}
    )
    devices = parse_gpus(gpus)

    def log(outcome: ModelOutcome) -> None:
        if outcome.result is None:
            logger.error("%s failed (%s): %s", outcome.job, outcome.device, outcome.error)
        else:
            r = outcome.result
            logger.info(
                "%s: %d steps, last loss %.4f, best val score %.4f (%s)",
                outcome.job,
                r.steps,
                r.last_loss,
                r.best_score,
                outcome.device,
            )

    outcomes = train_all(Path(store), Path(runs), settings, resume, devices, on_done=log)
    failed = {o.job: o.error for o in outcomes if o.result is None}
    if len(failed) == len(outcomes):
        raise LiverpipeError(
            Path(runs),
            f"every model failed: {failed}",
            "read RUNS/<model>/train.log or the errors above",
        )
    paths = evaluate_runs(store=store, runs=runs, out=report, config=config)
    return {"failed": failed, "report": paths}
