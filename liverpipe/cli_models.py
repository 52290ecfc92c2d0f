"""``liverpipe models``: the registry's champions, promotion and rollback (Typer)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from liverpipe._console import table_console
from liverpipe.ops import ENSEMBLE, REGISTRY, Decision, Registry
from liverpipe.rundir import RunRecord, run_folders
from liverpipe.settings import load_settings

__all__ = ["models_app", "print_decisions"]

models_app = typer.Typer(
    help="Versioned runs and the champion of each model and of the ensemble.",
    no_args_is_help=True,
)

RunsOpt = Annotated[Path, typer.Option("--runs", "-r", help="Runs root of `liverpipe train-all`.")]
KeyOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--model", "-m", help="A model name or 'ensemble'; repeatable. Default: all of them."
    ),
]
ForceOpt = Annotated[
    bool,
    typer.Option("--force", help="Skip the not-worse check; the history records that."),
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML file; its \\[registry] rule applies.")
]


def print_decisions(decisions: Sequence[Decision]) -> None:
    """One line per key: promoted or not, the two scores and the reason."""
    table = Table(title="promotion (frozen test cases)")
    for column in ("key", "run", "decision", "liver Dice new/old", "tumour Dice new/old", "why"):
        table.add_column(column, no_wrap=column == "run")
    for d in decisions:
        verdict = ("forced " if d.forced else "") + ("promoted" if d.promoted else "kept champion")
        table.add_row(
            d.key,
            d.run_id,
            verdict,
            f"{d.score_text('challenger', 'liver_dice')}/{d.score_text('champion', 'liver_dice')}",
            f"{d.score_text('challenger', 'tumour_global_dice')}/{d.score_text('champion', 'tumour_global_dice')}",
            f"{d.reason} ({len(d.cases)} case(s))" if d.cases else d.reason,
        )
    table_console().print(table)


@models_app.command("list")
def list_cmd(
    runs: RunsOpt = Path("runs"),
    as_json: Annotated[
        bool, typer.Option("--json", help="Print runs, champions and history as JSON.")
    ] = False,
) -> None:
    """The versioned runs (newest last), the champions and the promotion history.

    Example: liverpipe models list --runs runs
    """
    from liverpipe.ops import require_runs

    registry = Registry.load(require_runs(runs))
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "runs": [RunRecord.read(f).run_id for f in run_folders(runs)],
                    "champions": registry.champions,
                    "history": [asdict(d) for d in registry.history],
                },
                indent=1,
            )
        )
        return
    champions: dict[str, list[str]] = {}
    for key, run_id in registry.champions.items():
        champions.setdefault(run_id, []).append(key)
    table = Table(title=f"runs in {runs}")
    table.add_column("run", no_wrap=True)
    for column in ("models", "train/val/test cases", "store", "champion of"):
        table.add_column(column)
    for folder in run_folders(runs):
        record = RunRecord.read(folder)
        counts = "/".join(str(len(record.cases.get(s, []))) for s in ("train", "val", "test"))
        table.add_row(
            record.run_id,
            ", ".join(record.models),
            counts,
            f"{record.store} ({record.store_config_hash[:8]})",
            ", ".join(sorted(champions.get(record.run_id, []))),
        )
    table_console().print(table)
    history = Table(title=f"history ({runs / REGISTRY})")
    for column in ("time", "action", "key", "run", "previous", "forced", "reason"):
        history.add_column(column, no_wrap=column in {"run", "previous"})
    for d in registry.history:
        history.add_row(
            d.time,
            d.action,
            d.key,
            d.run_id,
            d.previous or "-",
            "yes" if d.forced else "",
            d.reason,
        )
    table_console().print(history)


@models_app.command("promote")
def promote_cmd(
    run: Annotated[str, typer.Argument(help="A run id (a folder of RUNS), or its path.")],
    runs: RunsOpt = Path("runs"),
    model: KeyOpt = None,
    force: ForceOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Make RUN the champion of each model (and the ensemble) it is not worse than the
    champion for, on the test cases neither trained or validated on.

    Example: liverpipe models promote 20261128T081500Z-3f9c2a1b --runs runs
    """
    from liverpipe.models import pick_device
    from liverpipe.ops import challenge, require_runs

    require_runs(runs)
    run_id = Path(run).name
    settings = load_settings(config)
    decisions = challenge(
        runs, run_id, settings.registry, device=pick_device(), keys=model or None, force=force
    )
    print_decisions(decisions)
    if not all(d.promoted or d.reason == "already the champion" for d in decisions):
        raise typer.Exit(1)


@models_app.command("rollback")
def rollback_cmd(
    runs: RunsOpt = Path("runs"),
    model: KeyOpt = None,
    force: ForceOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Make the previous champion the champion again (default: of the ensemble), under the
    same not-worse check; --force rolls back anyway.

    Example: liverpipe models rollback --runs runs --force
    """
    from liverpipe.models import pick_device
    from liverpipe.ops import require_runs, rollback

    require_runs(runs)
    settings = load_settings(config)
    keys = model or [ENSEMBLE]
    decisions = rollback(runs, settings.registry, pick_device(), keys, force)
    print_decisions(decisions)
    if not all(d.promoted for d in decisions):
        raise typer.Exit(1)
