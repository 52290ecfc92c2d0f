"""``evaluate``: score every run (and their ensemble) and publish the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from liverpipe.evaluate import (
    SPLITS,
    Evaluation,
    evaluate,
    headline_split,
    headline_table,
    write_report,
)
from liverpipe.models import pick_device
from liverpipe.settings import load_settings

__all__ = ["evaluate_runs", "headline_markdown"]


def headline_markdown(evaluation: Evaluation, report_html: Path) -> str:
    """The report's headline table, as markdown, with the report's path."""
    aggregates = evaluation.aggregates()
    title = f"### liverpipe headline ({headline_split(aggregates)} split, mean over cases)"
    table = headline_table(aggregates).markdown()
    return "\n".join([title, "", table, "", f"Full report: `{report_html}`"])


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
        splits=splits or list(SPLITS),
        device=device,
        tta=tta,
        on_case=lambda split, case: logger.info("scored %s/%s", split, case),
        settings=settings.evaluate,
    )
    paths = write_report(result, Path(runs), Path(out))
    markdown = headline_markdown(result, paths["html"].resolve())
    create_markdown_artifact(markdown, key="liverpipe-report", description="Evaluation headline")
    print(markdown)
    return {name: str(path) for name, path in paths.items()}
