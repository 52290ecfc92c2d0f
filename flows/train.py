"""``train-all``: train the three models into a new versioned run, evaluate it, publish
the report, and let it challenge the champions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.evaluate import evaluate_runs
from liverpipe.errors import LiverpipeError
from liverpipe.models import pick_device
from liverpipe.ops import Decision, challenge
from liverpipe.settings import load_settings
from liverpipe.train import ModelOutcome, parse_gpus, start_run, train_all

__all__ = ["decisions_markdown", "train_all_flow"]


def decisions_markdown(decisions: list[Decision]) -> str:
    """The promotion decisions as a markdown table: both scores, the rule, the cases."""
    lines = [
        "### liverpipe promotion",
        "",
        "| key | run | decision | liver Dice (new / champion) | tumour global Dice (new / "
        "champion) | reason | frozen cases |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in decisions:
        verdict = ("forced " if d.forced else "") + ("promoted" if d.promoted else "rejected")
        lines.append(
            f"| {d.key} | {d.run_id} | {verdict} | {d.score_text('challenger', 'liver_dice')} / "
            f"{d.score_text('champion', 'liver_dice')} | {d.score_text('challenger', 'tumour_global_dice')} / "
            f"{d.score_text('champion', 'tumour_global_dice')} | {d.reason} | {', '.join(d.cases) or '-'} |"
        )
    if decisions and decisions[0].rule:
        rule = decisions[0].rule
        lines += [
            "",
            f"Rule: liver Dice at most {rule['liver_dice_tolerance']:g} and tumour global Dice "
            f"at most {rule['tumour_dice_tolerance']:g} below the champion.",
        ]
    return "\n".join(lines)


@flow(name="train-all", log_prints=True)
def train_all_flow(
    store: str = "stores/liver.zarr",
    runs: str = "runs",
    config: str | None = None,
    steps: int | None = None,
    gpus: str = "auto",
    report: str = "report",
    *,
    cpu_jobs: int | None = None,
    resume: bool = False,
    promote: bool = True,
) -> dict[str, Any]:
    """Train both stages (liver, tumour) of UnetPlusPlus, MAnet and DeepLabV3Plus into a new
    run RUNS/<run_id> (one job per GPU when there are several; without a GPU, CPU_JOBS
    side by side, by default one per core), evaluate every cascade,
    stage 1 alone and the ensemble into REPORT, then challenge the champions."""
    logger = get_run_logger()
    settings = load_settings(
        Path(config) if config else None, {"train": {"steps": steps}, "tumour": {"steps": steps}}
    )
    devices = parse_gpus(gpus)
    run = start_run(Path(runs), Path(store), settings, resume=resume)
    logger.info("run %s", run)

    def log(outcome: ModelOutcome) -> None:
        if outcome.result is None:
            logger.error("%s failed (%s): %s", outcome.job, outcome.device, outcome.error)
        else:
            r = outcome.result
            logger.info(
                "%s: %s, last loss %.4f, best val score %.4f (%s)",
                outcome.job,
                r.steps_text,
                r.last_loss,
                r.best_score,
                outcome.device,
            )

    outcomes = train_all(
        Path(store), run, settings, resume=resume, gpus=devices, cpu_jobs=cpu_jobs, on_done=log
    )
    failed = {o.job: o.error for o in outcomes if o.result is None}
    if len(failed) == len(outcomes):
        raise LiverpipeError(
            run,
            f"every model failed: {failed}",
            "read RUNS/<run_id>/<model>/<stage>/train.log or the errors above",
        )
    paths = evaluate_runs(store=store, runs=str(run), out=report, config=config)
    decisions = []
    if promote and not failed:
        decisions = challenge(Path(runs), run.name, settings.registry, device=pick_device())
        markdown = decisions_markdown(decisions)
        create_markdown_artifact(markdown, key="liverpipe-promotion", description="Promotion")
        print(markdown)
    return {
        "run_id": run.name,
        "failed": failed,
        "report": paths,
        "promoted": [d.key for d in decisions if d.promoted],
        "decisions": [d.reason for d in decisions],
    }
