"""The configuration reference (docs/configuration.md), generated from the pydantic models.

``python -m liverpipe.config_docs > docs/configuration.md`` rewrites it; a test fails when
the file and the models disagree, so the reference cannot drift.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from liverpipe.settings import ENV_PREFIX, Settings

__all__ = ["reference_markdown"]


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += _rows(annotation, f"{prefix}.{name}")
            continue
        default: Any = field.get_default(call_default_factory=True)
        shown = json.dumps(
            default.model_dump(mode="json") if isinstance(default, BaseModel) else default
        )
        kind = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
        env = f"{ENV_PREFIX}{prefix.upper().replace('.', '__')}__{name.upper()}"
        rows.append(
            f"| `{prefix}.{name}` | `{kind}` | `{shown}` | {field.description or ''} | `{env}` |"
        )
    return rows


def reference_markdown() -> str:
    """Every setting: section, key, type, default, description and environment variable."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from the pydantic models in `liverpipe/settings.py` by",
        "`python -m liverpipe.config_docs > docs/configuration.md`; a test checks that this",
        "file is current. Settings come from a TOML file (`--config`), then",
        f"`{ENV_PREFIX}<SECTION>__<FIELD>` environment variables, then command-line flags,",
        "in increasing priority. Unknown keys are errors; `liverpipe config` prints the",
        "resolved values. `configs/tiny.toml` is the CPU-sized set, `configs/full.toml` the",
        "GPU-sized one.",
        "",
    ]
    for section, field in Settings.model_fields.items():
        model = field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        lines += [
            f"## `[{section}]`",
            "",
            (model.__doc__ or "").strip().splitlines()[0],
            "",
            "| key | type | default | meaning | environment variable |",
            "|---|---|---|---|---|",
            *_rows(model, section),
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown(), end="")
