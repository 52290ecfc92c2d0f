"""The model registry: which run is the champion of each model and of the ensemble.

``RUNS/registry.json`` is plain JSON, written atomically, readable without liverpipe::

    {"champions": {"ensemble": "<run_id>", "manet": "<run_id>", ...},
     "history": [{"time", "action", "key", "run_id", "previous", "promoted", "forced",
                  "reason", "scores": {"challenger": {...}, "champion": {...}},
                  "cases": [...], "rule": {...}}, ...]}

A challenger replaces a champion only when it is not worse on a frozen set of test
cases that neither run trained or validated on (:mod:`liverpipe.ops.promotion` scores them).
Nothing here imports torch: the scheduled ingest reads the registry on every tick.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from liverpipe._files import read_json, write_json_atomic
from liverpipe.errors import LiverpipeError
from liverpipe.settings import RegistryConfig

__all__ = ["ENSEMBLE", "REGISTRY", "Decision", "Registry", "judge"]

REGISTRY = "registry.json"
ENSEMBLE = "ensemble"


@dataclass(frozen=True)
class Decision:
    """One line of the history: a promotion, a rejection or a rollback of one key."""

    time: str
    action: str  # "promote", "reject", "rollback"
    key: str  # a model name or "ensemble"
    run_id: str
    previous: str | None
    promoted: bool
    forced: bool
    reason: str
    scores: dict[str, dict[str, float | None]] = field(default_factory=dict)
    cases: list[str] = field(default_factory=list)
    rule: dict[str, float] = field(default_factory=dict)

    def score_text(self, who: str, name: str) -> str:
        """One recorded score (``who``: challenger or champion) for a table, "-" when none."""
        value = self.scores.get(who, {}).get(name)
        return "-" if value is None else f"{value:.4f}"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Decision:
        return cls(
            time=str(data["time"]),
            action=str(data["action"]),
            key=str(data["key"]),
            run_id=str(data["run_id"]),
            previous=None if data.get("previous") is None else str(data["previous"]),
            promoted=bool(data["promoted"]),
            forced=bool(data.get("forced", False)),
            reason=str(data.get("reason", "")),
            scores={str(k): dict(v) for k, v in data.get("scores", {}).items()},
            cases=[str(c) for c in data.get("cases", [])],
            rule={str(k): float(v) for k, v in data.get("rule", {}).items()},
        )


@dataclass(frozen=True)
class Registry:
    """Champions per key and the full history, oldest first."""

    champions: dict[str, str]
    history: tuple[Decision, ...] = ()

    @classmethod
    def load(cls, root: Path) -> Registry:
        path = Path(root) / REGISTRY
        data = read_json(path, {"champions": {}, "history": []})
        try:
            return cls(
                {str(k): str(v) for k, v in data["champions"].items()},
                tuple(Decision.from_dict(d) for d in data["history"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise LiverpipeError(
                path,
                f"the registry cannot be read ({err!r})",
                "restore it from a backup; every decision is also in the Prefect artifacts",
            ) from err

    def save(self, root: Path) -> None:
        write_json_atomic(
            Path(root) / REGISTRY,
            {"champions": self.champions, "history": [asdict(d) for d in self.history]},
        )

    def record(self, decision: Decision) -> Registry:
        """The registry after ``decision`` (its champion changes when it promoted)."""
        champions = dict(self.champions)
        if decision.promoted:
            champions[decision.key] = decision.run_id
        return replace(self, champions=champions, history=(*self.history, decision))

    def previous_champion(self, key: str) -> str | None:
        """The champion before the current one of ``key`` (what a rollback returns to)."""
        current = self.champions.get(key)
        for decision in reversed(self.history):
            if decision.key == key and decision.promoted and decision.run_id == current:
                return decision.previous
        return None


def judge(
    challenger: Mapping[str, float], champion: Mapping[str, float], rule: RegistryConfig
) -> tuple[bool, str]:
    """Not worse than the champion: liver Dice within ``liver_dice_tolerance`` and tumour
    global Dice within ``tumour_dice_tolerance``. An undefined champion score (no tumour
    in the frozen set) does not block; an undefined challenger score where the champion
    has one does."""
    reasons = []
    for key, tolerance in (
        ("liver_dice", rule.liver_dice_tolerance),
        ("tumour_global_dice", rule.tumour_dice_tolerance),
    ):
        new, old = challenger.get(key, math.nan), champion.get(key, math.nan)
        if math.isnan(old):
            continue
        if math.isnan(new) or new < old - tolerance:
            reasons.append(f"{key} {new:.4f} is below the champion's {old:.4f} - {tolerance:g}")
    if reasons:
        return False, "; ".join(reasons)
    return True, "not worse than the champion on the frozen test cases"
