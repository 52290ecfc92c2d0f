"""``evaluate``: score every run (and their ensemble) and publish the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from liverpipe.evaluate import SPLITS, evaluate
from liverpipe.models import pick_device
from liverpipe.report import HEADLINE, headline_rows, headline_split, write_report
from liverpipe.settings import load_settings

__all__ = ["evaluate_runs", "headline_markdown"]


def headline_markdown(metrics_path: Path, report_html: Path) -> str:
    """The headline table of a metrics.json, as markdown, with the report's path."""
    aggregates = json.loads(metrics_path.read_text())["aggregates"]
    head = ["model", *(label for label, _, _ in HEADLINE)]
    split = headline_split(aggregates)
    lines = [
        f"### liverpipe headline ({split} split, mean over cases)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(row) + " |" for row in headline_rows(aggregates)),
        "",
        f"Full report: `{report_html}`",
    ]
    return "\n".join(lines)


@flow(name="evaluate", log_prints=True)
def evaluate_runs(
    store: str = "stores/liver.zarr",
    runs: str = "runs",
    out: str = "report",
    splits: list[str] | None = None,
    tta: bool = False,
    config: str | None = None,
) -> dict[str, Any]:
    """Evaluate every run under RUNS on the store's splits; write metrics.json and the report."""
    settings = load_settings(Path(config) if config else None)
    device = pick_device()
    logger = get_run_logger()
    result = evaluate(
        Path(store),
        Path(runs),
        splits or list(SPLITS),
        device,
        tta,
        on_case=lambda split, case: logger.info("evaluating %s/%s", split, case),
        empty_rule=settings.evaluate.empty_rule,
        max_train_cases=settings.evaluate.max_train_cases,
    )
    paths = write_report(result, Path(runs), Path(out))
    markdown = headline_markdown(paths["metrics"], paths["html"].resolve())
    create_markdown_artifact(markdown, key="liverpipe-report", description="Evaluation headline")
    print(markdown)
    return {name: str(path) for name, path in paths.items()}
