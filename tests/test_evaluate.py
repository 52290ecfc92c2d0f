"""Evaluation and the report on a tiny trained run: numbers, tables, figures, errors."""

from __future__ import annotations

import base64
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO

from liverpipe.evaluate import class_masks, evaluate, overlap
from liverpipe.infer import PostProcess, Predictor, predict_path
from liverpipe.models import CheckpointMismatchError, load_cascade
from liverpipe.preprocess import preprocess_dataset, serial_runner
from liverpipe.settings import load_settings
from storage import SliceStore

MODELS = ["deeplabv3plus", "ensemble", "manet", "unetplusplus"]


class _Tables(HTMLParser):
    """Collects seed-table cells (model, split, metric) -> text, and image sources."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple[str, str, str], str] = {}
        self.images: list[str] = []
        self._model = ""
        self._cell: tuple[str, str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "td" and "data-metric" in a:
            self._cell = (a["data-model"] or "", a["data-split"] or "", a["data-metric"] or "")
        elif tag == "img":
            self.images.append(a["src"] or "")

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self.cells[self._cell] = data.strip()
            self._cell = None


@pytest.fixture(scope="module")
def report(tiny_store: Path, tiny_runs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from typer.testing import CliRunner

    from liverpipe.cli import app

    out = tmp_path_factory.mktemp("report")
    args = ["evaluate", "--store", str(tiny_store), "--runs", str(tiny_runs), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "report:" in result.stdout and "headline" in result.stdout
    return out


def test_html_tables_equal_metrics_json_and_figures_are_embedded(report: Path) -> None:
    metrics = json.loads((report / "metrics.json").read_text())
    parser = _Tables()
    parser.feed((report / "report.html").read_text())
    assert sorted(metrics["models"]) == MODELS
    table = metrics["seed_table"]
    assert table["columns"] == ["deeplabv3plus", "manet", "unetplusplus", "ensemble"]
    labels = [r["metric"] for r in table["rows"] if r["split"] == "train"]
    assert labels[:4] == ["Loss", "Pixel Accuracy", "Balanced Accuracy", "Jaccard (liver)"]
    assert {"Dice (tumour)", "HD95 mm (liver)", "Recall (liver)", "Precision (tumour)"} <= set(
        labels
    )
    checked = 0
    for row in table["rows"]:
        for model, value in row["values"].items():
            cell = parser.cells[(model, row["split"], row["key"])]
            assert cell == ("–" if value is None else f"{value:.4f}"), (model, row)
            checked += 1
    assert checked == len(table["rows"]) * 4 >= 13 * 2 * 4
    # the table's numbers are the aggregates' means
    for row in table["rows"]:
        for model, value in row["values"].items():
            aggregate = metrics["aggregates"][model].get(row["split"])
            node = aggregate
            for key in row["key"].split("."):
                node = node[key]
            assert value == node["mean"]
    pngs = [
        base64.b64decode(src.split(",", 1)[1])
        for src in parser.images
        if src.startswith("data:image/png;base64,")
    ]
    assert len(pngs) == len(parser.images) >= 3 and all(p[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    html = (report / "report.html").read_text()
    assert "[lits] LiTS convention" in html  # the empty rule in force is printed
    assert metrics["empty_rule_name"] == "lits"
    assert metrics["tumour_decision"] == PostProcess().describe()  # the rule in force
    assert PostProcess().describe() in html
    assert {k.split("/")[0] for k in metrics["checkpoint_selection"]} == set(MODELS) - {"ensemble"}
    assert metrics["stage1"] == [f"{m} stage 1" for m in table["columns"]]
    assert "stage 1" in html and "cascade" in html
    markdown = (report / "report.md").read_text()
    splits = {r["split"] for r in table["rows"]}
    assert markdown.count(" | Dice (liver) | ") == len(splits)
    assert "| case | split | model | liver Dice |" in markdown  # the per-case table
    assert html.count("<tr>") > len(metrics["cases"])


def test_every_case_is_scored_for_every_model_with_sane_values(
    report: Path, tiny_store: Path
) -> None:
    metrics = json.loads((report / "metrics.json").read_text())
    store = SliceStore.open(tiny_store)
    expected = {c for s in ("train", "val", "test") for c in store.cases(s)}
    headline = set(store.cases("test"))  # stage 1 alone is scored where the headline looks
    for model in [*MODELS, *metrics["stage1"]]:
        rows = [c for c in metrics["cases"] if c["model"] == model]
        assert {r["case_id"] for r in rows} == (headline if "stage 1" in model else expected)
        for row in rows:
            assert 0 <= row["pixel_accuracy"] <= 1 and row["loss"] > 0
            for cls in ("liver", "tumour"):
                d = row["classes"][cls]["dice"]
                assert d is None or 0 <= d <= 1
    for model, per in metrics["aggregates"].items():
        scored = headline if "stage 1" in model else expected
        assert sum(agg["cases"] for agg in per.values()) == len(scored), model


def test_evaluation_scores_what_predict_writes(
    phantom_dir: Path, tiny_store: Path, tiny_runs: Path, tmp_path: Path
) -> None:
    """The native-grid Dice in the evaluation is the Dice of `predict`'s mask file."""
    store = SliceStore.open(tiny_store)
    case_id = store.cases("train")[0]
    meta = store.case(case_id).meta
    result = evaluate(tiny_store, tiny_runs, splits=["train"])
    row = next(c for c in result.cases if c.case_id == case_id and c.model == "manet")
    predict_path(
        Predictor([load_cascade(tiny_runs / "manet")]),
        Path(meta.source_image),
        tmp_path / "m.nii.gz",
    )
    mask = np.asarray(nib.load(tmp_path / "m.nii.gz").dataobj)
    truth = np.asarray(nib.load(meta.source_label).dataobj).astype(np.uint8)
    for cls in ("liver", "tumour"):
        expected = overlap(class_masks(mask)[cls], class_masks(truth)[cls])["dice"]  # LiTS rule
        got = row.cls(cls).dice
        assert (math.isnan(expected) and math.isnan(got)) or got == pytest.approx(
            expected, abs=1e-9
        )


def test_cases_scored_side_by_side_give_the_same_rows_in_the_same_order(
    tiny_store: Path, tiny_runs: Path
) -> None:
    """Threads score several cases at a time; the rows, their order, the overlays and
    the progress callbacks are those of one case at a time."""
    from liverpipe.settings import EvaluateConfig

    calls: dict[int, list[tuple[str, str]]] = {1: [], 3: []}
    results = {
        w: evaluate(
            tiny_store,
            tiny_runs,
            settings=EvaluateConfig(workers=w),
            on_case=lambda s, c, w=w: calls[w].append((s, c)),
        )
        for w in (1, 3)
    }
    one, three = results[1], results[3]
    assert len(one.cases) > 3 * len(MODELS)
    assert [c.to_dict() for c in three.cases] == [c.to_dict() for c in one.cases]
    assert calls[3] == calls[1] and len(calls[1]) == sum(len(v) for v in one.splits.values())
    assert list(three.overlays) == list(one.overlays)


def test_runs_of_another_store_config_are_refused(
    phantom_dir: Path, tiny_runs: Path, tmp_path: Path
) -> None:
    settings = load_settings(
        REPO / "configs" / "tiny.toml", {"preprocess": {"slice_size": (48, 48)}}
    )
    preprocess_dataset(phantom_dir, tmp_path / "other.zarr", settings, serial_runner)
    with pytest.raises(
        CheckpointMismatchError, match="evaluate against the store the run was trained on"
    ):
        evaluate(tmp_path / "other.zarr", tiny_runs)


def test_docs_state_the_rules_the_code_applies() -> None:
    from liverpipe.evaluate import LESION_RULE, empty_rule_text

    text = (REPO / "docs" / "evaluation.md").read_text()
    assert empty_rule_text("lits") in text and empty_rule_text("exclude") in text
    assert LESION_RULE in text
    assert PostProcess().describe() in text  # the cascade's default tumour decision


def test_the_headline_scores_tumour_where_it_is_and_false_alarms_where_it_is_not() -> None:
    """A model that never predicts tumour must not look good: tumour Dice is taken over
    the cases with tumour, and tumour-free cases count as clean only with no tumour."""
    from liverpipe.evaluate import HEADLINE, CaseScore, Evaluation, case_metrics, headline_table

    truth_with = np.zeros((8, 16, 16), np.uint8)
    truth_with[2:6, 2:14, 2:14] = 1
    truth_with[3:5, 4:8, 4:8] = 2
    truth_without = np.where(truth_with == 2, 1, truth_with).astype(np.uint8)
    half = truth_with.copy()
    half[3:5, 4:6, 4:8] = 1  # half of the tumour found: Dice 2/3
    alarm = truth_without.copy()
    alarm[3, 10:12, 10:12] = 2  # a false tumour in a tumour-free case
    cases = {
        "blind": [truth_without, truth_without, truth_without],  # never predicts tumour
        "finder": [half, truth_without, alarm],
    }
    truths = [truth_with, truth_without, truth_without]
    evaluation = Evaluation("s", "h", list(cases), {"test": ["a", "b", "c"]})
    for model, preds in cases.items():
        for case_id, pred, truth in zip("abc", preds, truths, strict=True):
            metrics = case_metrics(pred, truth, (1.0, 1.0, 1.0))
            evaluation.cases.append(CaseScore(case_id, "test", model, 0.0, metrics))
    per = evaluation.aggregates()
    columns = {c.label: c for c in HEADLINE}
    dice = columns["tumour Dice (cases with tumour)"].value
    clean = columns["tumour-free cases clean"].value
    blind, finder = per["blind"]["test"], per["finder"]["test"]
    # The LiTS-rule mean gives the blind model 2/3 for the two tumour-free cases.
    assert blind.cls("tumour").dice.mean == pytest.approx(2 / 3)
    assert dice(blind) == 0.0 and clean(blind) == 1.0
    assert dice(finder) == pytest.approx(2 / 3) and clean(finder) == 0.5
    table = headline_table(per)
    rows = {r[0]: r for r in table.rows}
    column = table.head.index("tumour Dice (cases with tumour)")
    assert rows["blind"][column] == "0.0000" and rows["finder"][column] == "0.6667"
    # each column's key names where metrics.json holds the same number
    record = evaluation.to_json()["aggregates"]["finder"]["test"]
    for c in HEADLINE:
        node = record
        for key in c.key.split("."):
            node = node[key]
        node = node["mean"] if isinstance(node, dict) else node
        assert node == pytest.approx(c.value(finder), nan_ok=True), c.label


@pytest.mark.parametrize("codes", ["LPS", "SAR", "IPL"])
def test_the_overlay_holds_canonical_slices_that_own_their_memory(
    phantom_dir: Path, tmp_path: Path, codes: str
) -> None:
    """The report's overlay is, for the CT, the truth and each prediction, the canonical
    axial slice with the most liver, on any storage order; each is a copy of that one
    slice, so an evaluation keeps slices, not a native volume per case and model."""
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    from liverpipe.evaluate.scoring import _axial_overlay
    from liverpipe.geometry import to_canonical
    from liverpipe.infer import prepare_scan
    from liverpipe.settings import PreprocessConfig

    paths = {}
    for kind in ("imagesTr", "labelsTr"):
        source = sorted((phantom_dir / kind).glob("*.nii*"))[0]
        image = nib.load(source)
        turn = ornt_transform(io_orientation(image.affine), axcodes2ornt(tuple(codes)))
        paths[kind] = tmp_path / f"{kind}.nii.gz"
        nib.save(image.as_reoriented(turn), paths[kind])
    label_image = nib.load(paths["labelsTr"])
    truth = np.asarray(label_image.dataobj).astype(np.uint8)
    scan = prepare_scan(paths["imagesTr"], PreprocessConfig(), keep_source=True)
    assert scan.source is not None
    prediction = (truth == 0).astype(np.uint8)  # unlike the truth on every slice

    overlay = _axial_overlay(scan, truth, {"model": prediction})

    canonical_truth, _ = to_canonical(truth, label_image.affine)
    z = int(np.argmax((canonical_truth > 0).sum(axis=(1, 2))))
    for name, volume in (("ct", scan.source), ("truth", truth), ("model", prediction)):
        expected = to_canonical(volume, label_image.affine)[0][z]
        np.testing.assert_array_equal(overlay[name], expected)
        assert overlay[name].base is None and overlay[name].flags.c_contiguous
    assert overlay["truth"].any() and not np.array_equal(overlay["model"], overlay["truth"])
