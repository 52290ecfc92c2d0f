"""Evaluate every trained run (and their ensemble) on the store's splits, on native grids.

Each case is preprocessed once from its source scan with the store's recorded config;
each model's prediction goes back through the exact inverse of preprocessing (the same
path as ``liverpipe predict``, post-processing included) and is scored against the
source label file on the scan's own grid. The loss (Dice + cross-entropy, as trained)
is computed on the stored grid against the stored labels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import segmentation_models_pytorch as smp
import torch

from liverpipe._files import strict_json
from liverpipe._system import available_cpus
from liverpipe.evaluate.metrics import (
    CLASSES,
    LESION_RULE,
    EmptyRule,
    case_metrics,
    empty_rule_text,
)
from liverpipe.evaluate.records import Aggregate, CaseScore, Column
from liverpipe.infer import (
    PostProcess,
    Predictor,
    PreparedScan,
    liver_stage,
    prepare_scan,
    tumour_stage,
)
from liverpipe.io import read_header, read_voxels
from liverpipe.models import CheckpointMismatchError, Run, find_models, load_cascade
from liverpipe.preprocess import canonical_view
from liverpipe.settings import EvaluateConfig
from storage import SPLITS, SliceStore

__all__ = [
    "ENSEMBLE",
    "SEED_ROWS",
    "SPLITS",
    "STAGE1",
    "Evaluation",
    "evaluate",
    "seed_table",
]

ENSEMBLE = "ensemble"
#: Cases scored at a time by default (``[evaluate] workers = 0``): one per core, at most
#: this many (each holds a scan, its softmax and label volumes in memory).
_AUTO_WORKERS = 4
#: Suffix of a model's stage-1-alone results.
STAGE1 = "stage 1"


def _class_column(label: str, cls: str, metric: str) -> Column:
    return Column(
        f"{label} ({cls})", f"classes.{cls}.{metric}", lambda a: getattr(a.cls(cls), metric).mean
    )


#: The seed project's table: one row per figure, one column per model.
SEED_ROWS: list[Column] = [
    Column("Loss", "loss", lambda a: a.loss.mean),
    Column("Pixel Accuracy", "pixel_accuracy", lambda a: a.pixel_accuracy.mean),
    Column("Balanced Accuracy", "balanced_accuracy", lambda a: a.balanced_accuracy.mean),
    *[
        _class_column(label, cls, metric)
        for label, metric in (
            ("Jaccard", "jaccard"),
            ("Precision", "precision"),
            ("Recall", "recall"),
            ("Dice", "dice"),
            ("HD95 mm", "hd95"),
        )
        for cls in CLASSES
    ],
]


def seed_table(aggregates: dict[str, dict[str, Aggregate]], models: list[str]) -> dict[str, Any]:
    """Rows: split x (Loss, Pixel Accuracy, Jaccard, Precision, Recall, Dice, HD95); columns: models."""
    rows = []
    for split in SPLITS:
        if not any(split in aggregates[m] for m in models):
            continue
        for column in SEED_ROWS:
            values = {
                m: column.value(aggregates[m][split]) if split in aggregates[m] else math.nan
                for m in models
            }
            rows.append(
                {"split": split, "metric": column.label, "key": column.key, "values": values}
            )
    return {"columns": models, "rows": rows}


def _check_store(run: Run, store: SliceStore) -> None:
    if run.store_config_hash != store.meta.config_hash:
        raise CheckpointMismatchError(
            run.checkpoint,
            f"the model was trained on a store with config {run.store_config_hash}, but "
            f"{store.root} has config {store.meta.config_hash}",
            "evaluate against the store the run was trained on, or retrain on this store",
        )


def _loss(probs: np.ndarray, label: np.ndarray) -> float:
    """Dice + cross-entropy of mean probabilities (C, Z, Y, X) against stored labels."""
    log_p = torch.from_numpy(np.log(np.clip(probs, 1e-7, 1.0))).permute(1, 0, 2, 3)
    target = torch.from_numpy(label.astype(np.int64))
    dice = smp.losses.DiceLoss("multiclass", from_logits=True)(log_p, target)
    return float(dice + torch.nn.functional.nll_loss(log_p, target))


@dataclass
class Evaluation:
    """Per-case rows, aggregates and the overlay material the report draws."""

    store: str
    config_hash: str
    models: list[str]  # the cascades (each model, then their ensemble)
    splits: dict[str, list[str]]
    stage1: list[str] = field(default_factory=list)  # the same models' stage 1 alone
    train_total: int = 0  # train cases in the store (``splits`` may hold fewer)
    cases: list[CaseScore] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    empty_rule: EmptyRule = "lits"
    selection: dict[str, str] = field(default_factory=dict)
    decision: str = ""  # the cascade's tumour decision rule (``PostProcess.describe``)
    overlays: dict[tuple[str, str], dict[str, np.ndarray]] = field(default_factory=dict)

    def aggregates(self) -> dict[str, dict[str, Aggregate]]:
        """model -> split -> :class:`Aggregate` (the splits it has cases in)."""
        out: dict[str, dict[str, Aggregate]] = {}
        for model in [*self.models, *self.stage1]:
            out[model] = {}
            for split in self.splits:
                rows = [c for c in self.cases if c.model == model and c.split == split]
                if rows:
                    out[model][split] = Aggregate.of(rows)
        return out

    def to_json(self) -> dict[str, Any]:
        """metrics.json: strict JSON, NaN as null."""
        aggregates = self.aggregates()
        return strict_json(
            {
                "store": self.store,
                "config_hash": self.config_hash,
                "models": self.models,
                "stage1": self.stage1,
                "splits": {s: len(ids) for s, ids in self.splits.items()},
                "empty_rule": empty_rule_text(self.empty_rule),
                "empty_rule_name": self.empty_rule,
                "checkpoint_selection": self.selection,
                "tumour_decision": self.decision,
                "lesion_rule": LESION_RULE,
                "seed_table": seed_table(aggregates, self.models),
                "aggregates": {
                    model: {split: agg.to_dict() for split, agg in per.items()}
                    for model, per in aggregates.items()
                },
                "cases": [c.to_dict() for c in self.cases],
                "skipped": self.skipped,
            }
        )


def evaluate(
    store_path: Path,
    runs_dir: Path,
    *,
    splits: Sequence[str] = SPLITS,
    device: torch.device | None = None,
    tta: bool = False,
    post: PostProcess | None = None,
    on_case: Callable[[str, str], None] | None = None,
    settings: EvaluateConfig | None = None,
) -> Evaluation:
    """Score every model under ``runs_dir`` (and their ensemble) on ``splits`` of the
    store: the cascade, and stage 1 alone beside it (``"<model> stage 1"``).

    ``tta`` averages, per stage, the flips its runs trained with. ``settings``
    (``[evaluate]``): ``empty_rule`` scores classes absent from a case's ground truth
    (:func:`~liverpipe.evaluate.metrics.empty_rule_text`), ``max_train_cases`` > 0 scores
    only the first that many train cases, ``workers`` cases are scored at a time.
    ``on_case(split, case_id)`` is called as each case's rows are added, in case order."""
    settings = settings or EvaluateConfig()
    empty_rule, max_train_cases = settings.empty_rule, settings.max_train_cases
    workers = settings.workers or min(available_cpus(), _AUTO_WORKERS)
    device = device or torch.device("cpu")
    post = post or PostProcess()
    store = SliceStore.open(store_path)
    cascades = [load_cascade(p, device) for p in find_models(runs_dir)]
    members = {c.name: Predictor([c], device, tta, post) for c in cascades}
    if len(cascades) > 1:
        members[ENSEMBLE] = Predictor(cascades, device, tta, post)
    for predictor in members.values():
        for run in predictor.runs:
            _check_store(run, store)
    chosen = {s: store.cases(s) for s in splits}  # type: ignore[arg-type]
    if max_train_cases and "train" in chosen:
        chosen["train"] = chosen["train"][:max_train_cases]
    result = Evaluation(
        str(store.root),
        store.meta.config_hash,
        list(members),
        chosen,
        stage1=[f"{name} {STAGE1}" for name in members],
        empty_rule=empty_rule,
        train_total=len(store.cases("train")),
        selection={
            f"{c.name}/{r.stage}": _selection(r)
            for c in cascades
            for r in (c.liver, c.tumour)
            if r is not None
        },
        decision=post.describe(),
    )
    first = cascades[0].liver
    # Stage 1 alone is scored where the report's headline looks: the first of test, val,
    # train that has cases (scoring on native grids costs seconds per case and row).
    headline = next((s for s in ("test", "val", "train") if chosen.get(s)), None)
    jobs = [(split, case_id) for split, case_ids in chosen.items() for case_id in case_ids]

    def one(job: tuple[str, str]) -> _Scored:
        return _score_case(
            store, members, first, job, with_stage1=job[0] == headline, empty_rule=empty_rule
        )

    # Cases are independent: threads overlap one case's single-threaded NumPy/SciPy
    # metrics with another's inference (both release the GIL). Rows keep case order.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for job, scored in zip(jobs, pool.map(one, jobs), strict=True):
            if scored.skipped:
                result.skipped[job[1]] = scored.skipped
            result.cases.extend(scored.rows)
            if scored.overlay is not None:
                result.overlays[job] = scored.overlay
            if on_case:
                on_case(*job)
    return result


@dataclass(frozen=True)
class _Scored:
    """One case's rows, its overlay material, or why it was skipped."""

    rows: list[CaseScore]
    overlay: dict[str, np.ndarray] | None
    skipped: str | None = None


def _score_case(
    store: SliceStore,
    members: dict[str, Predictor],
    first: Run,
    where: tuple[str, str],
    *,
    with_stage1: bool,
    empty_rule: EmptyRule,
) -> _Scored:
    """Every member's cascade (and stage 1 alone, ``with_stage1``) on one case, scored on
    its native grid. Ensembles reuse their members' stage-1 softmax."""
    split, case_id = where
    meta = store.case(case_id).meta
    if (
        meta.source_label is None
        or not Path(meta.source_label).is_file()
        or not Path(meta.source_image).is_file()
    ):
        reason = "its source scan or label file is no longer where the store recorded it"
        return _Scored([], None, reason)
    scan = prepare_scan(Path(meta.source_image), first.preprocess, first.zscore, keep_source=True)
    stored_label = store.case(case_id).load()[1]
    truth = np.asarray(read_voxels(read_header(Path(meta.source_label)))).astype(np.uint8)
    window = (slice(None), slice(None), scan.window[0], scan.window[1])
    liver_probs: dict[str, np.ndarray] = {}
    predictions = {}
    rows = []
    for name, predictor in members.items():
        liver_models, tumour_models = predictor.stages()
        if name == ENSEMBLE:
            probs = np.mean([liver_probs[m] for m in liver_probs], axis=0)
        else:
            probs = liver_stage(scan.image, liver_models, predictor.device)
            liver_probs[name] = probs
        out = tumour_stage(probs, scan.image, scan.grid.spacing, tumour_models, predictor.device)
        scored = [(name, out.final), (f"{name} {STAGE1}", out.liver)]
        for label, p in scored if with_stage1 else scored[:1]:
            labels = predictor.native(p, scan, cascade=label == name)
            if label == name:
                predictions[name] = labels
            rows.append(
                CaseScore(
                    case_id=case_id,
                    split=split,
                    model=label,
                    loss=_loss(p[window], stored_label),
                    metrics=case_metrics(labels, truth, scan.info.spacing, empty_rule),
                )
            )
    return _Scored(rows, _axial_overlay(scan, truth, predictions))


def _selection(run: Run) -> str:
    """How the run's checkpoint was chosen (its result.json)."""
    return run.selection or f"{run.checkpoint.name} (unfinished run)"


def _axial_overlay(
    scan: PreparedScan, truth: np.ndarray, predictions: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """CT (HU), truth and predictions on the canonical axial slice with the most liver.

    The volumes are looked at through canonical views and only the one slice is copied,
    so the report keeps a slice per case, not the volumes."""
    assert scan.source is not None, "prepare_scan(keep_source=True) keeps the CT"
    t = canonical_view(truth, scan.geometry)
    z = int(np.argmax((t > 0).sum(axis=(1, 2))))
    volumes = {"ct": scan.source, "truth": truth, **predictions}
    return {
        name: canonical_view(v, scan.geometry)[z].copy()  # C order, its own memory
        for name, v in volumes.items()
    }


def write_metrics(evaluation: Evaluation, out_dir: Path) -> Path:
    """``out_dir/metrics.json``: strict JSON, NaN written as null."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metrics.json"
    path.write_text(json.dumps(evaluation.to_json(), indent=2, allow_nan=False))
    return path
