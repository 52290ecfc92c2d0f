"""The local Prefect server and the serving process: start, wait, stop.

``liverpipe serve`` starts ``prefect server start`` on 127.0.0.1 when ``PREFECT_API_URL``
is not set (or reuses a healthy server already on the port), then ``python -m
flows.serve``, which registers and serves the deployments. Their process ids go to
``PREFECT_HOME/liverpipe-serve.json`` so that ``liverpipe down`` stops exactly what was
started. Telemetry is off and ``PREFECT_HOME`` defaults to ``./.prefect``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from http import HTTPStatus
from pathlib import Path
from typing import Any

from liverpipe.errors import LiverpipeError

__all__ = ["Served", "prefect_env", "serve_all", "stop", "wait_for_deployments"]

QUIET = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
STATE_FILE = "liverpipe-serve.json"
NAMES = (
    "preprocess/preprocess",
    "train-all/train-all",
    "evaluate/evaluate",
    "predict/predict",
    "ingest/ingest",
)


def prefect_env(home: Path | None = None, port: int = 4200) -> dict[str, str]:
    """The environment every Prefect process of ours gets."""
    env = {**os.environ, **QUIET}
    env.setdefault("PREFECT_HOME", str((home or Path(".prefect")).resolve()))
    env.setdefault("PREFECT_API_URL", f"http://127.0.0.1:{port}/api")
    return env


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except (urllib.error.URLError, OSError):
        return 0


def healthy(api_url: str) -> bool:
    return _get(f"{api_url}/health") == HTTPStatus.OK


def _wait(
    check: Any, timeout: float, what: str, log: Path | None, proc: subprocess.Popen[bytes] | None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(1.0)
    tail = (
        log.read_text(errors="replace").strip().splitlines()[-5:] if log and log.is_file() else []
    )
    raise LiverpipeError(
        log or Path("."),
        f"{what} did not come up within {timeout:.0f} s"
        + (f"; log ends: {' | '.join(tail)}" if tail else ""),
        "read the log; free the port (`liverpipe down`), or set PREFECT_API_URL to a running server",
    )


def wait_for_deployments(api_url: str, timeout: float = 180.0) -> None:
    """Return once every liverpipe deployment is registered on the server."""
    _wait(
        lambda: all(_get(f"{api_url}/deployments/name/{n}") == HTTPStatus.OK for n in NAMES),
        timeout,
        "the deployments",
        None,
        None,
    )


class Served:
    """The processes started by one ``serve_all``; ``stop`` ends them."""

    def __init__(self, home: Path, server: int | None, serve: int) -> None:
        self.home, self.server, self.serve = home, server, serve
        (home / STATE_FILE).write_text(json.dumps({"server": server, "serve": serve}))


def serve_all(
    env: dict[str, str],
    serve_args: list[str],
    start_server: bool,
    detach: bool,
    server_timeout: float = 120.0,
) -> tuple[Served, subprocess.Popen[bytes]]:
    """Start the server (if asked and not already healthy) and the serving process."""
    home = Path(env["PREFECT_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    api = env["PREFECT_API_URL"]
    server_pid = None
    if start_server and not healthy(api):
        port = api.rsplit(":", 1)[1].split("/")[0]
        log = home / "server.log"
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                port,
            ],
            env=env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=detach,
        )
        server_pid = server.pid
        _wait(lambda: healthy(api), server_timeout, "the Prefect server", log, server)
    log = home / "serve.log"
    serving = subprocess.Popen(
        [sys.executable, "-m", "flows.serve", *serve_args],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=detach,
    )
    return Served(home, server_pid, serving.pid), serving


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _signal(pid: int, sig: int) -> None:
    """The whole process group when the process leads one (detached), else the process."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def stop(home: Path, timeout: float = 20.0) -> list[int]:
    """Stop the serving process, then the server, recorded under ``home``; returns pids stopped."""
    state_file = home / STATE_FILE
    if not state_file.is_file():
        return []
    state = json.loads(state_file.read_text())
    stopped = []
    for pid in (state.get("serve"), state.get("server")):
        if not pid or not _alive(pid):
            continue
        _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
        stopped.append(pid)
    state_file.unlink(missing_ok=True)
    return stopped
