"""The comparison report: metrics.json, report.md and a self-contained report.html.

The report shows the seed project's table (loss, pixel accuracy, Jaccard, precision,
recall, then Dice and HD95, for the training, validation and test splits), a headline
table, per-case strip plots, learning curves, best/median/worst overlays, and a
comparison paragraph generated from the numbers. Plots are matplotlib (Agg) PNGs,
embedded in the HTML as base64 so the file can be mailed on its own.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from liverpipe.evaluate.metrics import LESION_RULE, empty_rule_text
from liverpipe.evaluate.records import Aggregate, CaseScore, Column, Table, format_score
from liverpipe.evaluate.scoring import STAGE1, Evaluation, seed_table, write_metrics
from liverpipe.labels import DEFAULT_HU_WINDOW, Label
from liverpipe.rundir import StageDir, resolve_run

__all__ = ["HEADLINE", "headline_split", "headline_table", "write_report"]

SPLIT_NAMES = {"train": "Training", "val": "Validation", "test": "Test"}
#: The headline's figures (means over cases unless pooled). Tumour Dice is over the cases
#: that have tumour; "clean" is the share of tumour-free cases given no tumour at all.
HEADLINE = [
    Column("liver Dice", "classes.liver.dice", lambda a: a.cls("liver").dice.mean),
    Column(
        "tumour Dice (cases with tumour)",
        "classes.tumour.dice_present",
        lambda a: a.cls("tumour").dice_present.mean,
    ),
    Column(
        "tumour global Dice", "classes.tumour.global_dice", lambda a: a.cls("tumour").global_dice
    ),
    Column(
        "tumour-free cases clean",
        "classes.tumour.clean_when_absent",
        lambda a: a.cls("tumour").clean_when_absent,
    ),
    Column("liver HD95 mm", "classes.liver.hd95", lambda a: a.cls("liver").hd95.mean, False),
    Column("tumour HD95 mm", "classes.tumour.hd95", lambda a: a.cls("tumour").hd95.mean, False),
    Column("lesion F1", "lesions.f1", lambda a: a.lesions.f1),
]

#: Scores closer than this print alike at 4 decimals: the summary calls them a tie.
TIE = 5e-5


Aggregates = dict[str, dict[str, Aggregate]]


def headline_split(aggregates: Aggregates) -> str:
    """The split the headline uses: test if evaluated, else val, else train."""
    present = {s for per in aggregates.values() for s in per}
    return next(s for s in ("test", "val", "train") if s in present)


def headline_table(aggregates: Aggregates) -> Table:
    """The headline: one row per model (cascades, ensemble, stage 1 alone) on
    :func:`headline_split`. The CLI, the ``evaluate`` flow and the report print this."""
    split = headline_split(aggregates)
    rows = [
        [model, *(format_score(c.value(per[split])) for c in HEADLINE)]
        for model, per in aggregates.items()
        if split in per
    ]
    return Table(["model", *(c.label for c in HEADLINE)], rows, css="headline")


def _comparison(aggregates: Aggregates) -> str:
    split = headline_split(aggregates)
    sentences = []
    for column in HEADLINE:
        label, higher = column.label, column.higher
        scores = {
            m: column.value(per[split])
            for m, per in aggregates.items()
            if split in per and not m.endswith(STAGE1) and not math.isnan(column.value(per[split]))
        }
        if len(scores) <= 1:
            continue
        ranked = sorted(scores.items(), key=lambda kv: -kv[1] if higher else kv[1])
        (best, top), (second, runner) = ranked[0], ranked[1]
        if abs(top - runner) < TIE:
            tied = [m for m, v in ranked if abs(v - top) < TIE]
            sentences.append(f"{', '.join(tied)} tie on {label} at {top:.4f}")
            continue
        sentences.append(
            f"{best} leads on {label} with {top:.4f}, {abs(top - runner):.4f} "
            f"{'ahead of' if higher else 'below'} {second} ({runner:.4f})"
        )
    if not sentences:
        return "Only one model was evaluated, so there is nothing to compare."
    cases = next(per[split].cases for per in aggregates.values() if split in per)
    return (
        f"On the {SPLIT_NAMES[split].lower()} split ({cases} cases): " + "; ".join(sentences) + "."
    )


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return buffer.getvalue()


def _strip_plots(evaluation: Evaluation) -> bytes:
    panels = [("liver", "dice"), ("tumour", "dice"), ("liver", "hd95"), ("tumour", "hd95")]
    fig = Figure(figsize=(4 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels))
    rng = np.random.default_rng(0)
    for ax, (cls, metric) in zip(axes, panels, strict=True):
        for i, model in enumerate(evaluation.models):
            values = [
                v
                for c in evaluation.cases
                if c.model == model and not math.isnan(v := getattr(c.cls(cls), metric))
            ]
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(values)), values, s=14, alpha=0.7)
            if values:
                ax.hlines(np.median(values), i - 0.3, i + 0.3, color="k")
        ax.set_xticks(range(len(evaluation.models)), evaluation.models, rotation=30)
        ax.set_title(f"{cls} {metric}")
    fig.suptitle("Per case, all evaluated splits (bar: median)")
    return _png(fig)


def _learning_curves(runs_dir: Path, models: list[str]) -> bytes | None:
    """Training loss and validation score of each model's stages (solid: liver stage,
    dashed: tumour stage)."""
    fig = Figure(figsize=(10, 3.6))
    loss_ax, val_ax = fig.subplots(1, 2)
    drawn = False
    for model in models:
        for stage, style in (("liver", "-"), ("tumour", "--")):
            history = StageDir(runs_dir / model / stage).history
            if not history.is_file():
                continue
            rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
            steps = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
            vals = [
                (r["step"], r["val"]["score"])
                for r in rows
                if r.get("val") and r["val"].get("score") is not None
            ]
            label = f"{model} {stage}"
            if steps:
                loss_ax.plot(*zip(*steps, strict=True), style, label=label)
                drawn = True
            if vals:
                val_ax.plot(*zip(*vals, strict=True), style, marker="o", label=label)
    if not drawn:
        return None
    loss_ax.set(title="training loss", xlabel="step")
    val_ax.set(
        title="validation score (Dice pooled over val cases, mean of classes present)",
        xlabel="step",
    )
    loss_ax.legend(fontsize=7)
    return _png(fig)


def _overlays(evaluation: Evaluation, split: str) -> dict[str, bytes]:
    """Best, median and worst case (by liver Dice) of each model: CT with contours."""
    low, high = DEFAULT_HU_WINDOW
    figures = {}
    for model in evaluation.models:
        rows = [
            c
            for c in evaluation.cases
            if c.model == model and c.split == split and not math.isnan(c.cls("liver").dice)
        ]
        if not rows:
            continue
        rows.sort(key=lambda r: r.cls("liver").dice)
        picks = {"worst": rows[0], "median": rows[len(rows) // 2], "best": rows[-1]}
        fig = Figure(figsize=(12, 4.2))
        axes = fig.subplots(1, 3)
        for ax, (title, row) in zip(axes, picks.items(), strict=True):
            # radiological view: patient's right on the image's left, anterior up
            slices = {k: v[:, ::-1] for k, v in evaluation.overlays[(split, row.case_id)].items()}
            ax.imshow(np.clip(slices["ct"], low, high), cmap="gray", origin="lower")
            for mask, colour, style in (
                (slices["truth"] >= 1, "lime", "solid"),
                (slices["truth"] == Label.TUMOUR, "yellow", "solid"),
                (slices[model] >= 1, "red", "dashed"),
                (slices[model] == Label.TUMOUR, "magenta", "dashed"),
            ):
                if mask.any() and not mask.all():
                    ax.contour(mask, levels=[0.5], colors=colour, linestyles=style, linewidths=1)
            dice = row.cls("liver").dice
            ax.set_title(f"{title}: {row.case_id}\nliver Dice {dice:.3f}", fontsize=9)
            ax.axis("off")
        fig.suptitle(
            f"{model} ({split}): truth solid (liver green, tumour yellow), "
            "prediction dashed (red, magenta); radiological view"
        )
        figures[model] = _png(fig)
    return figures


def _seed_table(table: dict[str, Any]) -> Table:
    """metrics.json's seed table; each cell names its model, split and metric (data-*)."""
    models = table["columns"]
    rows = table["rows"]
    return Table(
        ["split", "metric", *models],
        [
            [SPLIT_NAMES[r["split"]], r["metric"], *(format_score(r["values"][m]) for m in models)]
            for r in rows
        ],
        css="seed",
        row_heads=2,
        attrs=[
            [{"data-model": m, "data-split": r["split"], "data-metric": r["key"]} for m in models]
            for r in rows
        ],
    )


def _case_row(c: CaseScore) -> list[str]:
    """Dice, HD95, liver volume error and lesion counts of one model on one case."""
    liver, tumour, lesions = c.cls("liver"), c.cls("tumour"), c.metrics.lesions
    true_ml, pred_ml = liver.volume_true_ml, liver.volume_pred_ml
    error = 100 * (pred_ml - true_ml) / true_ml if true_ml else math.nan
    return [
        c.case_id,
        SPLIT_NAMES[c.split],
        c.model,
        format_score(liver.dice),
        format_score(tumour.dice),
        format_score(liver.hd95),
        f"{true_ml:.1f}",
        f"{pred_ml:.1f}",
        "–" if math.isnan(error) else f"{error:+.1f}",
        f"{lesions.true_lesions} / {lesions.predicted} / {lesions.detected}",
    ]


CASE_HEAD = [
    "case",
    "split",
    "model",
    "liver Dice",
    "tumour Dice",
    "liver HD95 mm",
    "liver mL (true)",
    "liver mL (pred)",
    "volume error %",
    "lesions true / pred / detected",
]


def _context(evaluation: Evaluation) -> str:
    sizes = ", ".join(
        f"{SPLIT_NAMES[s].lower()} {len(ids)}" for s, ids in evaluation.splits.items()
    )
    if evaluation.train_total > len(evaluation.splits.get("train", [])):
        sizes += (
            f" (the first {len(evaluation.splits['train'])} of {evaluation.train_total} train "
            "cases, [evaluate] max_train_cases)"
        )
    skipped = (
        f" Skipped: {len(evaluation.skipped)} case(s) whose source files are gone."
        if evaluation.skipped
        else ""
    )
    chosen = " ".join(f"{m}: {how}." for m, how in sorted(evaluation.selection.items()))
    decision = f" Cascade masks: {evaluation.decision}." if evaluation.decision else ""
    return (
        f"Store `{evaluation.store}` (preprocessing config {evaluation.config_hash}). Cases per split: "
        f"{sizes}. Each model is a cascade: stage 1 finds the liver on whole slices, stage 2 "
        f"segments liver and tumour inside the liver's bounding box at full resolution; the "
        f"headline and the seed table score the cascade, and the '{STAGE1}' rows score stage 1 "
        f"alone, so the gain is visible.{decision} "
        f"Metrics are computed per case on each scan's native grid after mapping the "
        f"prediction back through the inverse of preprocessing; the loss (Dice + cross-entropy) "
        f"on the stored grid. Liver is labels 1 and 2, tumour label 2. Empty ground truth: "
        f"the {evaluation.empty_rule} rule (see Rules).{skipped} Checkpoints: {chosen}"
    )


def write_report(evaluation: Evaluation, runs_dir: Path, out_dir: Path) -> dict[str, Path]:
    """Write metrics.json, report.md, report.html and the PNGs into ``out_dir``.

    ``runs_dir`` is the evaluated run folder, or a runs root (its newest run)."""
    runs_dir = resolve_run(runs_dir)
    metrics_path = write_metrics(evaluation, out_dir)
    aggregates = evaluation.aggregates()
    split = headline_split(aggregates)
    images = {"per_case": _strip_plots(evaluation)}
    curves = _learning_curves(runs_dir, [m for m in evaluation.models if (runs_dir / m).is_dir()])
    if curves:
        images["learning_curves"] = curves
    images.update({f"overlay_{m}": png for m, png in _overlays(evaluation, split).items()})
    for name, png in images.items():
        (out_dir / f"{name}.png").write_bytes(png)
    tables = {
        "headline": headline_table(aggregates),
        "seed": _seed_table(seed_table(aggregates, evaluation.models)),
        "cases": Table(CASE_HEAD, [_case_row(c) for c in evaluation.cases], css="cases"),
    }
    sections = _sections(split, _comparison(aggregates))
    md = ["# liverpipe evaluation report", "", _context(evaluation), ""]
    page = [f"<h1>liverpipe evaluation report</h1><p>{html.escape(_context(evaluation))}</p>"]
    for title, before, table, after in sections:
        md += [f"## {title}", ""]
        md += [before, ""] if before else []
        md += [tables[table].markdown(), ""]
        md += [after, ""] if after else []
        page.append(f"<h2>{html.escape(title)}</h2>")
        page += [f"<p>{html.escape(before)}</p>"] if before else []
        page.append(tables[table].html())
        page += [f'<p class="comparison">{html.escape(after)}</p>'] if after else []
    rules = [empty_rule_text(evaluation.empty_rule), LESION_RULE]
    md += ["## Rules", "", f"- Empty ground truth: {rules[0]}", f"- Lesion detection: {rules[1]}"]
    md += ["", "## Figures", "", *(f"![{name}]({name}.png)" for name in images), ""]
    page.append(
        f'<h2>Rules</h2><p class="empty-rule">{html.escape(rules[0])}</p>'
        f"<p>{html.escape(rules[1])}</p><h2>Figures</h2>"
    )
    page += [
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{name}</figcaption></figure>"
        for name, png in images.items()
    ]
    (out_dir / "report.md").write_text("\n".join(md))
    (out_dir / "report.html").write_text(_HTML.format(body="\n".join(page)))
    return {
        "metrics": metrics_path,
        "markdown": out_dir / "report.md",
        "html": out_dir / "report.html",
    }


def _sections(split: str, comparison: str) -> list[tuple[str, str, str, str]]:
    """(title, text before, table, text after) of the report's table sections, in order."""
    return [
        (
            f"Headline ({SPLIT_NAMES[split].lower()} split, mean over cases)",
            "",
            "headline",
            comparison,
        ),
        ("Seed-project table (mean over cases)", "", "seed", ""),
        (
            "Per case",
            "Native-grid values; volume error = (predicted − true) / true liver volume.",
            "cases",
            "",
        ),
    ]


_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>liverpipe evaluation</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}img{{max-width:100%}}</style></head>
<body>{body}</body></html>
"""
