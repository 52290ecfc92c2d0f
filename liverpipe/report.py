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

from liverpipe.evaluate import STAGE1, Evaluation, aggregate_value, write_metrics
from liverpipe.labels import DEFAULT_HU_WINDOW
from liverpipe.metrics import LESION_RULE, empty_rule_text
from liverpipe.rundir import StageDir, resolve_run

__all__ = ["HEADLINE", "headline_rows", "headline_split", "write_report"]

SPLIT_NAMES = {"train": "Training", "val": "Validation", "test": "Test"}
#: (label, path into an aggregate, higher is better). Tumour Dice is over the cases that
#: have tumour; "clean" is the share of tumour-free cases given no tumour at all.
HEADLINE = [
    ("liver Dice", ("classes", "liver", "dice"), True),
    ("tumour Dice (cases with tumour)", ("classes", "tumour", "dice_present"), True),
    ("tumour global Dice", ("classes", "tumour", "global_dice"), True),
    ("tumour-free cases clean", ("classes", "tumour", "clean_when_absent"), True),
    ("liver HD95 mm", ("classes", "liver", "hd95"), False),
    ("tumour HD95 mm", ("classes", "tumour", "hd95"), False),
    ("lesion F1", ("lesions", "f1"), True),
]


def _fmt(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.4f}"


def headline_split(aggregates: dict[str, dict[str, Any]]) -> str:
    """The split the headline uses: test if evaluated, else val, else train."""
    present = {s for per in aggregates.values() for s in per}
    return next(s for s in ("test", "val", "train") if s in present)


def headline_rows(aggregates: dict[str, dict[str, Any]]) -> list[list[str]]:
    split = headline_split(aggregates)
    rows = []
    for model, per in aggregates.items():
        if split in per:
            rows.append(
                [model, *(_fmt(aggregate_value(per[split], path)) for _, path, _ in HEADLINE)]
            )
    return rows


def _comparison(aggregates: dict[str, dict[str, Any]]) -> str:
    split = headline_split(aggregates)
    sentences = []
    for label, path, higher in HEADLINE:
        scores = {
            m: aggregate_value(per[split], path)
            for m, per in aggregates.items()
            if split in per
            and not m.endswith(STAGE1)
            and not math.isnan(aggregate_value(per[split], path))
        }
        if len(scores) < 2:
            continue
        ranked = sorted(scores.items(), key=lambda kv: -kv[1] if higher else kv[1])
        (best, top), (second, runner) = ranked[0], ranked[1]
        if abs(top - runner) < 5e-5:
            tied = [m for m, v in ranked if abs(v - top) < 5e-5]
            sentences.append(f"{', '.join(tied)} tie on {label} at {top:.4f}")
            continue
        sentences.append(
            f"{best} leads on {label} with {top:.4f}, {abs(top - runner):.4f} "
            f"{'ahead of' if higher else 'below'} {second} ({runner:.4f})"
        )
    if not sentences:
        return "Only one model was evaluated, so there is nothing to compare."
    cases = next(per[split]["cases"] for per in aggregates.values() if split in per)
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
                c["classes"][cls][metric]
                for c in evaluation.cases
                if c["model"] == model and not math.isnan(c["classes"][cls][metric])
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
        rows = [c for c in evaluation.cases if c["model"] == model and c["split"] == split]
        rows = [r for r in rows if not math.isnan(r["classes"]["liver"]["dice"])]
        if not rows:
            continue
        rows.sort(key=lambda r: r["classes"]["liver"]["dice"])
        picks = {"worst": rows[0], "median": rows[len(rows) // 2], "best": rows[-1]}
        fig = Figure(figsize=(12, 4.2))
        axes = fig.subplots(1, 3)
        for ax, (title, row) in zip(axes, picks.items(), strict=True):
            # radiological view: patient's right on the image's left, anterior up
            slices = {
                k: v[:, ::-1] for k, v in evaluation.overlays[(split, row["case_id"])].items()
            }
            ax.imshow(np.clip(slices["ct"], low, high), cmap="gray", origin="lower")
            for mask, colour, style in (
                (slices["truth"] >= 1, "lime", "solid"),
                (slices["truth"] == 2, "yellow", "solid"),
                (slices[model] >= 1, "red", "dashed"),
                (slices[model] == 2, "magenta", "dashed"),
            ):
                if mask.any() and not mask.all():
                    ax.contour(mask, levels=[0.5], colors=colour, linestyles=style, linewidths=1)
            dice = row["classes"]["liver"]["dice"]
            ax.set_title(f"{title}: {row['case_id']}\nliver Dice {dice:.3f}", fontsize=9)
            ax.axis("off")
        fig.suptitle(
            f"{model} ({split}): truth solid (liver green, tumour yellow), "
            "prediction dashed (red, magenta); radiological view"
        )
        figures[model] = _png(fig)
    return figures


def _seed_table_md(table: dict[str, Any]) -> str:
    models = table["columns"]
    lines = [
        "| split | metric | " + " | ".join(models) + " |",
        "|---|---|" + "---|" * len(models),
    ]
    for row in table["rows"]:
        cells = [_fmt(_num(row["values"][m])) for m in models]
        lines.append(
            f"| {SPLIT_NAMES[row['split']]} | {row['metric']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def _seed_table_html(table: dict[str, Any]) -> str:
    models = table["columns"]
    head = "".join(f"<th>{html.escape(m)}</th>" for m in models)
    body = "".join(
        f"<tr><th>{SPLIT_NAMES[row['split']]}</th><th>{html.escape(row['metric'])}</th>"
        + "".join(
            f'<td data-model="{html.escape(m)}" data-split="{row["split"]}" '
            f'data-metric="{row["key"]}">{_fmt(_num(row["values"][m]))}</td>'
            for m in models
        )
        + "</tr>"
        for row in table["rows"]
    )
    return f'<table class="seed"><tr><th>split</th><th>metric</th>{head}</tr>{body}</table>'


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _case_rows(cases: list[dict[str, Any]]) -> list[list[str]]:
    """Per case and model: Dice, HD95, liver volume error and lesion counts."""
    rows = []
    for c in cases:
        liver, tumour, lesions = c["classes"]["liver"], c["classes"]["tumour"], c["lesions"]
        true_ml, pred_ml = liver["volume_true_ml"], liver["volume_pred_ml"]
        error = 100 * (pred_ml - true_ml) / true_ml if true_ml else math.nan
        rows.append(
            [
                c["case_id"],
                SPLIT_NAMES[c["split"]],
                c["model"],
                _fmt(_num(liver["dice"])),
                _fmt(_num(tumour["dice"])),
                _fmt(_num(liver["hd95"])),
                f"{true_ml:.1f}",
                f"{pred_ml:.1f}",
                "–" if math.isnan(error) else f"{error:+.1f}",
                f"{lesions['true_lesions']} / {lesions['predicted']} / {lesions['detected']}",
            ]
        )
    return rows


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
    return (
        f"Store `{evaluation.store}` (preprocessing config {evaluation.config_hash}). Cases per split: "
        f"{sizes}. Each model is a cascade: stage 1 finds the liver on whole slices, stage 2 "
        f"segments liver and tumour inside the liver's bounding box at full resolution; the "
        f"headline and the seed table score the cascade, and the '{STAGE1}' rows score stage 1 "
        f"alone, so the gain is visible. "
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
    record = json.loads(metrics_path.read_text())
    aggregates = _nan_back(record["aggregates"])
    seed = record["seed_table"]
    case_rows = _case_rows(_nan_back({"c": record["cases"]})["c"])
    split = headline_split(aggregates)
    images = {"per_case": _strip_plots(evaluation)}
    curves = _learning_curves(runs_dir, [m for m in evaluation.models if (runs_dir / m).is_dir()])
    if curves:
        images["learning_curves"] = curves
    images.update({f"overlay_{m}": png for m, png in _overlays(evaluation, split).items()})
    for name, png in images.items():
        (out_dir / f"{name}.png").write_bytes(png)
    head = ["model", *(label for label, _, _ in HEADLINE)]
    rows = headline_rows(aggregates)
    comparison = _comparison(aggregates)
    md = [
        "# liverpipe evaluation report",
        "",
        _context(evaluation),
        "",
        f"## Headline ({SPLIT_NAMES[split].lower()} split, mean over cases)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        comparison,
        "",
        "## Seed-project table (mean over cases)",
        "",
        _seed_table_md(seed),
        "",
        "## Per case",
        "",
        "Native-grid values; volume error = (predicted − true) / true liver volume.",
        "",
        "| " + " | ".join(CASE_HEAD) + " |",
        "|" + "---|" * len(CASE_HEAD),
        *("| " + " | ".join(r) + " |" for r in case_rows),
        "",
        "## Rules",
        "",
        f"- Empty ground truth: {empty_rule_text(evaluation.empty_rule)}",
        f"- Lesion detection: {LESION_RULE}",
        "",
        "## Figures",
        "",
        *(f"![{name}]({name}.png)" for name in images),
        "",
    ]
    (out_dir / "report.md").write_text("\n".join(md))
    figures = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{name}</figcaption></figure>"
        for name, png in images.items()
    )
    head_html = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    rows_html = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>liverpipe evaluation</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}img{{max-width:100%}}</style></head>
<body><h1>liverpipe evaluation report</h1><p>{html.escape(_context(evaluation))}</p>
<h2>Headline ({SPLIT_NAMES[split].lower()} split, mean over cases)</h2>
<table class="headline"><tr>{head_html}</tr>{rows_html}</table>
<p class="comparison">{html.escape(comparison)}</p>
<h2>Seed-project table (mean over cases)</h2>{_seed_table_html(seed)}
<h2>Per case</h2><p>Native-grid values; volume error = (predicted − true) / true liver volume.</p>
<table class="cases"><tr>{"".join(f"<th>{html.escape(h)}</th>" for h in CASE_HEAD)}</tr>{"".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in case_rows)}</table>
<h2>Rules</h2><p class="empty-rule">{html.escape(empty_rule_text(evaluation.empty_rule))}</p><p>{html.escape(LESION_RULE)}</p>
<h2>Figures</h2>{figures}</body></html>
"""
    (out_dir / "report.html").write_text(page)
    return {
        "metrics": metrics_path,
        "markdown": out_dir / "report.md",
        "html": out_dir / "report.html",
    }


def _nan_back(value: Any) -> Any:
    """metrics.json's nulls back to NaN, so the report reads exactly what the JSON says."""
    if isinstance(value, dict):
        return {k: _nan_back(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_back(v) for v in value]
    return math.nan if value is None else value
