"""Typed evaluation records, and the one table type the report, the CLI and the flow print.

- :class:`CaseScore`: one model on one case (its loss and :class:`CaseMetrics`);
- :class:`Aggregate`: one model over one split's cases (:class:`Stats` per metric,
  :class:`ClassAggregate` per class, pooled lesion counts);
- :class:`Column`: one figure of the headline or the seed table, read from an
  :class:`Aggregate` by a typed accessor; its ``key`` names where metrics.json holds it;
- :class:`Table`: a header and rows of text, rendered as Markdown and as HTML.

``to_dict()`` writes each record in metrics.json's layout, NaN included: the writer makes
it null (:func:`liverpipe._files.strict_json`).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from liverpipe.evaluate.metrics import CLASSES, CaseMetrics, ClassScore, LesionCounts

__all__ = [
    "Aggregate",
    "CaseScore",
    "ClassAggregate",
    "Column",
    "Stats",
    "Table",
    "format_score",
]

#: Per-case metrics of a class summarised over cases (mean, std, median).
SUMMARY_METRICS = ("dice", "jaccard", "precision", "recall", "hd95", "assd", "rvd")


def format_score(value: float) -> str:
    """A score as the tables print it: 4 decimals, a dash when undefined."""
    return "–" if math.isnan(value) else f"{value:.4f}"


@dataclass(frozen=True)
class CaseScore:
    """One model's scores on one case of one split."""

    case_id: str
    split: str
    model: str
    loss: float
    metrics: CaseMetrics

    def cls(self, name: str) -> ClassScore:
        return self.metrics.classes[name]

    def to_dict(self) -> dict[str, Any]:
        head = {"case_id": self.case_id, "split": self.split, "model": self.model}
        return {**head, "loss": self.loss, **self.metrics.to_dict()}


@dataclass(frozen=True)
class Stats:
    """Mean, standard deviation and median over the cases where a value is defined."""

    mean: float
    std: float
    median: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        finite = [v for v in values if not math.isnan(v)]
        if not finite:
            return cls(math.nan, math.nan, math.nan, 0)
        return cls(
            float(np.mean(finite)), float(np.std(finite)), float(np.median(finite)), len(finite)
        )


@dataclass(frozen=True)
class ClassAggregate:
    """One class over a split's cases.

    ``global_dice`` pools the voxels of every case. The clinical pair beside the LiTS
    mean: ``dice_present``, Dice over the cases that have the class, and
    ``clean_when_absent``, the share of cases without it where none was predicted (the
    LiTS rule's mean mixes both, so a model that never predicts tumour scores the share
    of tumour-free cases).
    """

    dice: Stats
    jaccard: Stats
    precision: Stats
    recall: Stats
    hd95: Stats
    assd: Stats
    rvd: Stats
    global_dice: float
    true_negative_cases: int
    dice_present: Stats
    absent_cases: int
    clean_when_absent: float

    @classmethod
    def of(cls, scores: Sequence[ClassScore]) -> ClassAggregate:
        summaries = {m: Stats.of([getattr(s, m) for s in scores]) for m in SUMMARY_METRICS}
        tp, fp, fn = (sum(getattr(s, k) for s in scores) for k in ("tp", "fp", "fn"))
        clean = sum(1 for s in scores if s.true_negative)
        absent = sum(1 for s in scores if not s.present)
        return cls(
            **summaries,
            global_dice=2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan,
            true_negative_cases=clean,
            dice_present=Stats.of([s.dice for s in scores if s.present]),
            absent_cases=absent,
            clean_when_absent=clean / absent if absent else math.nan,
        )


@dataclass(frozen=True)
class Aggregate:
    """One model over one split's cases."""

    cases: int
    loss: Stats
    pixel_accuracy: Stats
    balanced_accuracy: Stats
    classes: dict[str, ClassAggregate]
    lesions: LesionCounts

    @classmethod
    def of(cls, rows: Sequence[CaseScore]) -> Aggregate:
        return cls(
            cases=len(rows),
            loss=Stats.of([r.loss for r in rows]),
            pixel_accuracy=Stats.of([r.metrics.pixel_accuracy for r in rows]),
            balanced_accuracy=Stats.of([r.metrics.balanced_accuracy for r in rows]),
            classes={name: ClassAggregate.of([r.cls(name) for r in rows]) for name in CLASSES},
            lesions=sum((r.metrics.lesions for r in rows), LesionCounts(0, 0, 0, 0)),
        )

    def cls(self, name: str) -> ClassAggregate:
        return self.classes[name]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["lesions"] = self.lesions.as_dict()
        return out


@dataclass(frozen=True)
class Column:
    """One figure read from an :class:`Aggregate`: its label, where metrics.json holds it
    (``key``, dotted), the accessor, and whether higher is better."""

    label: str
    key: str
    value: Callable[[Aggregate], float]
    higher: bool = True


@dataclass(frozen=True)
class Table:
    """Rows of text under a header. ``row_heads`` leading columns are headers of their row
    (``<th>`` in HTML); ``attrs`` holds optional HTML attributes per row and cell."""

    head: list[str]
    rows: list[list[str]]
    css: str = ""
    row_heads: int = 0
    attrs: list[list[dict[str, str]]] = field(default_factory=list)

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.head) + " |", "|" + "---|" * len(self.head)]
        return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in self.rows)])

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.head)
        body = "".join(
            "<tr>" + "".join(self._cell(i, j, text) for j, text in enumerate(row)) + "</tr>"
            for i, row in enumerate(self.rows)
        )
        css = f' class="{self.css}"' if self.css else ""
        return f"<table{css}><tr>{head}</tr>{body}</table>"

    def _cell(self, i: int, j: int, text: str) -> str:
        if j < self.row_heads:
            return f"<th>{html.escape(text)}</th>"
        extra = self.attrs[i][j - self.row_heads] if self.attrs else {}
        attrs = "".join(f' {k}="{html.escape(v)}"' for k, v in extra.items())
        return f"<td{attrs}>{html.escape(text)}</td>"
