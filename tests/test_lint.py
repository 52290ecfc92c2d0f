"""The code stays typed and linted: ruff and strict mypy run as part of the suite."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_ruff_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "liverpipe", "storage", "flows", "tests", "bench"],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=REPO, check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
