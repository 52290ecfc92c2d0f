"""The ``liverpipe`` command: liverpipe's CLI (:mod:`liverpipe.cli`) plus the two commands
that run the Prefect side, ``serve`` and ``down``. They are registered here, on the same
Typer app, because liverpipe never imports flows (the layers: flows, liverpipe, storage).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from flows.server import prefect_env, serve_all, stop, wait_for_deployments
from liverpipe.cli import ConfigOpt, app, main
from liverpipe.errors import LiverpipeError

__all__ = ["app", "main"]


@app.command("serve")
def serve_cmd(
    config: ConfigOpt = None,
    port: Annotated[int, typer.Option(help="Port of the local server (127.0.0.1).")] = 4200,
    store: Annotated[str | None, typer.Option(help="Default store of the deployments.")] = None,
    runs: Annotated[str | None, typer.Option(help="Default runs folder.")] = None,
    inbox: Annotated[
        str | None, typer.Option(help="Inbox folder the ingest schedule scans.")
    ] = None,
    outputs: Annotated[str | None, typer.Option(help="Where ingest writes masks.")] = None,
    report: Annotated[str | None, typer.Option(help="Default report folder.")] = None,
    detach: Annotated[
        bool,
        typer.Option(
            "--detach", help="Return once the deployments are up; `liverpipe down` stops them."
        ),
    ] = False,
) -> None:
    """Serve the deployments (preprocess, train-all, evaluate, predict, ingest).

    Starts a local Prefect server on 127.0.0.1 unless PREFECT_API_URL names one.
    Example: liverpipe serve --detach --config configs/tiny.toml --store stores/liver.zarr
    """
    own_server = "PREFECT_API_URL" not in os.environ
    env = prefect_env(port=port)
    args = [f"--config={Path(config).resolve()}"] if config else []
    for name, value in (
        ("store", store),
        ("runs", runs),
        ("inbox", inbox),
        ("outputs", outputs),
        ("report", report),
    ):
        if value:
            args.append(f"--{name}={Path(value).resolve()}")
    home = Path(env["PREFECT_HOME"])
    stop(home)  # a previous serve of this home, if any
    served, serving = serve_all(env, args, own_server, detach)
    api = env["PREFECT_API_URL"]
    try:
        wait_for_deployments(api)
    except LiverpipeError:
        stop(home)
        raise
    ui = api.removesuffix("/api")
    typer.echo(f"serving preprocess, train-all, evaluate, predict, ingest on {api}")
    typer.echo(f"Prefect UI: {ui}   stop: liverpipe down (or make down)   logs: {home}")
    if detach:
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the cleanup below
    try:
        serving.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop(served.home)


@app.command("down")
def down_cmd() -> None:
    """Stop the server and serving process that `liverpipe serve` started."""
    home = Path(prefect_env()["PREFECT_HOME"])
    stopped = stop(home)
    typer.echo(f"stopped {len(stopped)} process(es)" if stopped else "nothing to stop")


if __name__ == "__main__":
    main()
