"""Serve liverpipe's deployments from this process: ``python -m flows.serve``.

Deployments are named after their flows: ``preprocess/preprocess``,
``train-all/train-all``, ``evaluate/evaluate``, ``predict/predict`` and
``ingest/ingest``. ``ingest`` runs on a cron schedule with a concurrency limit of 1 (a
run that would overlap a running one is cancelled, not queued). Schedules are not
paused on shutdown, so a restart picks them up again. ``liverpipe serve`` starts a local
server first when ``PREFECT_API_URL`` is not set.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from flows.evaluate import evaluate_runs
from flows.ingest import ingest
from flows.predict import predict_scans
from flows.preprocess import preprocess
from flows.train import train_all_flow
from liverpipe.settings import load_settings

__all__ = ["deployments", "main"]


def deployments(config: Path | None = None, defaults: dict[str, Any] | None = None) -> list[Any]:
    """The five deployments; ``defaults`` are default parameters shared where they apply."""
    settings = load_settings(config)
    shared = {"config": str(config)} if config else {}
    shared |= defaults or {}

    def params(flow_params: tuple[str, ...]) -> dict[str, Any]:
        return {k: v for k, v in shared.items() if k in flow_params}

    return [
        preprocess.to_deployment(
            "preprocess", parameters=params(("store", "config", "dask_address"))
        ),
        train_all_flow.to_deployment(
            "train-all", parameters=params(("store", "runs", "config", "report"))
        ),
        evaluate_runs.to_deployment("evaluate", parameters=params(("store", "runs"))),
        predict_scans.to_deployment("predict", parameters=params(("runs",))),
        ingest.to_deployment(
            "ingest",
            cron=settings.ingest.cron,
            concurrency_limit=ConcurrencyLimitConfig(
                limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
            ),
            parameters=params(
                ("inbox", "store", "runs", "outputs", "config", "report", "dask_address")
            ),
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__)
    parser.add_argument("--config", type=Path)
    for name in ("store", "runs", "inbox", "outputs", "report"):
        parser.add_argument(f"--{name}")
    args = parser.parse_args(argv)
    defaults = {
        k: v
        for k, v in vars(args).items()
        if k in {"store", "runs", "inbox", "outputs", "report"} and v
    }
    serve(*deployments(args.config, defaults), pause_on_shutdown=False)


if __name__ == "__main__":
    main()
