"""The code stays typed and linted: ruff and strict mypy run as part of the suite."""

from __future__ import annotations

import ast
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
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


#: liverpipe's rooms (subpackages); the layers between them are in pyproject.toml.
ROOMS = ("io", "preprocess", "models", "infer", "evaluate", "train", "ops", "synth")


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the packages under ``root``, with the project's contracts."""
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "lint-imports"),
            "--config",
            str(REPO / "pyproject.toml"),
        ],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        check=False,
        capture_output=True,
        text=True,
    )


def test_import_contract_is_kept() -> None:
    """flows -> liverpipe -> storage, and liverpipe's rooms in their layers (import-linter)."""
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("module", "upward"),
    [
        ("storage/schema.py", "import liverpipe.settings"),  # storage reaching up
        ("liverpipe/io/nifti.py", "import liverpipe.train"),  # a low room reaching up
        ("liverpipe/settings.py", "import flows.server"),  # liverpipe reaching into flows
    ],
)
def test_import_contract_catches_an_upward_import(tmp_path: Path, module: str, upward: str) -> None:
    """The contract is not vacuous: one upward import in a copy of the tree breaks it."""
    for package in ("flows", "liverpipe", "storage"):
        shutil.copytree(
            REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{upward}  # noqa\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout and upward.rsplit(maxsplit=1)[-1] in result.stdout, (
        result.stdout
    )


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import in ``path``; names empty for ``import x``."""
    found: list[tuple[int, str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names]
    return found


def test_rooms_are_entered_through_their_public_names() -> None:
    """Outside a room, liverpipe and flows import only names in the room's ``__all__``
    (never its modules), and only names in ``storage.__all__`` from storage."""
    public = {room: set(importlib.import_module(f"liverpipe.{room}").__all__) for room in ROOMS}
    public["storage"] = set(importlib.import_module("storage").__all__)
    problems = []
    for path in sorted([*(REPO / "liverpipe").rglob("*.py"), *(REPO / "flows").rglob("*.py")]):
        rel = path.relative_to(REPO)
        inside = rel.parts[1] if rel.parts[0] == "liverpipe" and len(rel.parts) > 2 else None
        for line, module, names in _imports(path):
            parts = module.split(".")
            room = parts[0] if parts[0] == "storage" else parts[1] if len(parts) > 1 else None
            if parts[0] not in ("liverpipe", "storage") or room not in public or room == inside:
                continue
            depth = 1 if room == "storage" else 2
            if len(parts) > depth:
                problems.append(f"{rel}:{line} imports the module {module}")
            problems += [
                f"{rel}:{line} imports {name}, not in {module}.__all__"
                for name in names
                if name not in public[room]
            ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("room", ROOMS)
def test_every_public_name_exists(room: str) -> None:
    package = importlib.import_module(f"liverpipe.{room}")
    assert package.__all__, room
    assert [n for n in package.__all__ if not hasattr(package, n)] == []
