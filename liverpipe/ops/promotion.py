"""Champion and challenger: score two runs on the same frozen cases, promote, roll back.

The frozen set is the store's test cases that neither run trained or validated on (from
each run's ``run.json``). Both are scored by the same code as ``liverpipe predict``
writes masks (each run with its own preprocessing), on the native grids: mean liver
Dice and tumour global Dice (voxels pooled over the cases). The registry is written once,
atomically, after every key was decided, so a run killed while scoring changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from liverpipe._files import strict_json
from liverpipe.errors import LiverpipeError
from liverpipe.io import read_header, read_voxels
from liverpipe.labels import Label
from liverpipe.ops.registry import ENSEMBLE, Decision, Registry, judge
from liverpipe.rundir import RunRecord
from liverpipe.settings import RegistryConfig
from storage import SliceStore, utc_now

if TYPE_CHECKING:  # the ingest inbox imports this module; torch loads only to score
    import torch

    from liverpipe.infer import Predictor

__all__ = ["challenge", "champion_models", "frozen_cases", "require_runs", "rollback", "score"]


def frozen_cases(store: SliceStore, runs: Sequence[RunRecord]) -> list[str]:
    """Labelled test cases of ``store`` that none of ``runs`` trained or validated on and
    whose source files are still there."""
    seen = set().union(*(r.seen for r in runs))
    entries = store.manifest.entries
    return [
        c
        for c in store.cases("test")
        if c not in seen
        and entries[c].label is not None
        and Path(entries[c].image).is_file()
        and Path(str(entries[c].label)).is_file()
    ]


def score(predictor: Predictor, store: SliceStore, cases: Sequence[str]) -> dict[str, float]:
    """Mean liver Dice and tumour global Dice of ``predictor``'s masks on ``cases``."""
    liver, tumour = [], np.zeros(3, dtype=np.int64)  # tp, fp, fn
    for case_id in cases:
        entry = store.manifest.entries[case_id]
        if entry.label is None:
            continue
        labels, _ = predictor.predict(Path(entry.image))
        truth = np.asarray(read_voxels(read_header(Path(entry.label))))
        p, t = labels >= Label.LIVER, truth >= Label.LIVER
        denominator = int(p.sum() + t.sum())
        liver.append(2 * int((p & t).sum()) / denominator if denominator else 1.0)
        p, t = labels == Label.TUMOUR, truth == Label.TUMOUR
        tumour += [int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum())]
    tp, fp, fn = (int(v) for v in tumour)
    return {
        "liver_dice": float(np.mean(liver)) if liver else math.nan,
        "tumour_global_dice": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan,
        "cases": float(len(liver)),
    }


def require_runs(root: Path) -> Path:
    """``root`` when it is a folder; else the error that names it (a mistyped --runs is
    not 'no champion')."""
    if not Path(root).is_dir():
        raise LiverpipeError(
            root,
            "there is no runs folder here",
            "pass --runs the folder that `liverpipe train-all --out` wrote",
        )
    return Path(root)


def champion_models(root: Path, key: str = ENSEMBLE) -> list[Path]:
    """The model folders of ``key``'s champion: every model of its run for the ensemble."""
    registry = Registry.load(require_runs(root))
    run_id = registry.champions.get(key)
    if run_id is None:
        raise LiverpipeError(
            root,
            f"the registry names no champion for {key!r}",
            "train with `liverpipe train-all --out RUNS` (its first run becomes champion) "
            "or name the models with --model",
        )
    return _models(Path(root) / run_id, key)


def _models(run: Path, key: str) -> list[Path]:
    from liverpipe.models import find_models

    return find_models(run) if key == ENSEMBLE else [run / key]


def _predictor(run: Path, key: str, device: torch.device) -> Predictor:
    from liverpipe.infer import Predictor
    from liverpipe.models import load_cascade

    return Predictor([load_cascade(p, device) for p in _models(run, key)], device)


def challenge(
    root: Path,
    run_id: str,
    rule: RegistryConfig,
    *,
    device: torch.device | None = None,
    keys: Sequence[str] | None = None,
    force: bool = False,
    action: str = "promote",
    on_key: Callable[[str], None] | None = None,
) -> list[Decision]:
    """Decide, for each key (each model of the run and the ensemble), whether ``run_id``
    replaces the champion; record the decisions in the registry. ``force`` promotes
    whatever the scores say, and the history says so."""
    import torch

    root = Path(root)
    device = device or torch.device("cpu")
    record = RunRecord.read(root / run_id)
    registry = Registry.load(root)
    store = SliceStore.open(Path(record.store))
    decisions = []
    for key in keys or [*record.models, ENSEMBLE]:
        if on_key:
            on_key(key)
        champion = registry.champions.get(key)
        verdict = _verdict(root, record, champion, key, store, rule, device=device)
        promoted = verdict.promoted or (force and champion != record.run_id)
        decisions.append(
            Decision(
                time=utc_now(),
                action=action if promoted else "reject",
                key=key,
                run_id=record.run_id,
                previous=champion,
                promoted=promoted,
                forced=promoted and not verdict.promoted,
                reason=f"forced: {verdict.reason}"
                if promoted and not verdict.promoted
                else verdict.reason,
                scores=verdict.scores,
                cases=verdict.cases,
                rule={
                    "liver_dice_tolerance": rule.liver_dice_tolerance,
                    "tumour_dice_tolerance": rule.tumour_dice_tolerance,
                },
            )
        )
        registry = registry.record(decisions[-1])
    registry.save(root)  # once, atomically: a run killed before this changes nothing
    return decisions


@dataclass(frozen=True)
class _Verdict:
    promoted: bool
    reason: str
    scores: dict[str, dict[str, float | None]] = field(default_factory=dict)
    cases: list[str] = field(default_factory=list)


def _verdict(
    root: Path,
    record: RunRecord,
    champion_id: str | None,
    key: str,
    store: SliceStore,
    rule: RegistryConfig,
    *,
    device: torch.device,
) -> _Verdict:
    if champion_id == record.run_id:
        return _Verdict(False, "already the champion")
    if champion_id is None:
        return _Verdict(True, "the first run: no champion yet")
    champion = RunRecord.read(root / champion_id)
    cases = frozen_cases(store, [record, champion])
    if not cases:
        return _Verdict(
            False, "no test case that neither run trained or validated on: nothing to compare on"
        )
    scores = {
        "challenger": score(_predictor(root / record.run_id, key, device), store, cases),
        "champion": score(_predictor(root / champion_id, key, device), store, cases),
    }
    promoted, reason = judge(scores["challenger"], scores["champion"], rule)
    return _Verdict(promoted, reason, strict_json(scores), list(cases))


def rollback(
    root: Path,
    rule: RegistryConfig,
    device: torch.device | None = None,
    keys: Sequence[str] = (ENSEMBLE,),
    force: bool = False,
) -> list[Decision]:
    """Make each key's previous champion the champion again, under the same checks."""
    registry = Registry.load(root)
    decisions = []
    for key in keys:
        previous = registry.previous_champion(key)
        if previous is None:
            raise LiverpipeError(
                root,
                f"{key!r} has no previous champion to roll back to",
                "`liverpipe models list` shows the history",
            )
        decisions += challenge(
            root, previous, rule, device=device, keys=[key], force=force, action="rollback"
        )
    return decisions
