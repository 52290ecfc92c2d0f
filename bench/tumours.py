"""Tumour goals of the cascade on held-out phantoms, against a threshold rule.

For each held-out case (phantoms the runs never trained on, any seed): the cascade of
each model and of their ensemble, and stage 1 alone, predicted exactly as
``liverpipe predict`` does and scored on the native grid: liver Dice, per-case tumour
Dice (cases with tumours), lesion recall by size, false lesions (predicted components
that touch no true tumour) and the tumour-free cases left clean. The baseline is the
rule from issue 11, with an oracle liver: smooth the image (Gaussian, sigma 1 mm), call
tumour any voxel at least ``--rule-hu`` below the liver's median inside the eroded true
liver.

Usage:
  python bench/tumours.py --runs RUNS --data HELD_OUT_DIR [--cases N] [--tta] [--json OUT]
  python bench/tumours.py --runs RUNS --synth 8 --seed 9001   # render the held-out set
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import cc3d
import numpy as np
import torch
from scipy import ndimage

from liverpipe._system import available_cpus
from liverpipe.evaluate import overlap
from liverpipe.infer import Predictor
from liverpipe.io import discover, read_header, read_voxels
from liverpipe.labels import Label
from liverpipe.models import find_models, load_cascade

#: Lesions of at least this equivalent-sphere diameter (mm) count for the recall goal.
BIG_LESION_MM = 10.0


def _lesions(truth: np.ndarray, pred: np.ndarray, voxel_mm3: float) -> list[tuple[float, bool]]:
    """(equivalent diameter mm, detected) of each true lesion: detected when the predicted
    tumour covers at least 20 % of it (a lenient LiTS-style hit)."""
    components = cc3d.connected_components(truth, connectivity=26)
    out = []
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        own = components[box] == index
        size = int(own.sum())
        hit = int((own & pred[box]).sum())
        diameter = (6 * size * voxel_mm3 / math.pi) ** (1 / 3)
        out.append((diameter, hit / size >= 0.2))
    return out


def _false_lesions(truth: np.ndarray, pred: np.ndarray) -> int:
    """Predicted tumour components (26-connected) that touch no true tumour."""
    components = cc3d.connected_components(pred, connectivity=26)
    touched = np.unique(components[truth & pred])
    return int(components.max()) - int((touched > 0).sum())


def _rule(
    image_hu: np.ndarray, liver: np.ndarray, spacing: np.ndarray, drop_hu: float
) -> np.ndarray:
    """The threshold baseline with an oracle liver (file-order arrays, spacing per axis)."""
    smooth = ndimage.gaussian_filter(image_hu.astype(np.float32), sigma=1.0 / spacing)
    inner = ndimage.binary_erosion(liver, iterations=2)
    median = float(np.median(image_hu[liver])) if liver.any() else 0.0
    return inner & (smooth <= median - drop_hu)


def _case_rows(name: str, pred: np.ndarray, truth: np.ndarray, voxel_mm3: float) -> dict[str, Any]:
    liver = overlap(pred >= Label.LIVER, truth >= Label.LIVER)["dice"]
    true_tumour, pred_tumour = truth == Label.TUMOUR, pred == Label.TUMOUR
    tumour = overlap(pred_tumour, true_tumour)["dice"] if true_tumour.any() else math.nan
    return {
        "method": name,
        "liver_dice": liver,
        "tumour_dice": tumour,
        "lesions": _lesions(true_tumour, pred_tumour, voxel_mm3),
        "false_lesions": _false_lesions(true_tumour, pred_tumour),
    }


def _summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        tumour = [r["tumour_dice"] for r in mine if not math.isnan(r["tumour_dice"])]
        lesions = [hit for r in mine for d, hit in r["lesions"] if d >= BIG_LESION_MM]
        free = [r["false_lesions"] == 0 for r in mine if math.isnan(r["tumour_dice"])]
        out[method] = {
            "liver_dice": float(np.mean([r["liver_dice"] for r in mine])),
            "tumour_dice_cases_with_tumour": float(np.mean(tumour)) if tumour else math.nan,
            "tumour_cases": len(tumour),
            "recall_lesions_ge_10mm": float(np.mean(lesions)) if lesions else math.nan,
            "lesions_ge_10mm": len(lesions),
            "false_lesions": sum(r["false_lesions"] for r in mine),
            "clean_tumour_free": float(np.mean(free)) if free else math.nan,
            "tumour_free_cases": len(free),
        }
    return out


def measure(
    runs: Path, data: Path, rule_hu: float = 12.0, cases: int = 0, tta: bool = False
) -> dict[str, Any]:
    """Every method's per-case rows on the held-out cases of ``data``, and the summary;
    ``tta``: predict with flip TTA (``liverpipe predict --tta``)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cascades = [load_cascade(p, device) for p in find_models(runs)]
    members = {c.name: Predictor([c], device, tta) for c in cascades}
    if len(cascades) > 1:
        members["ensemble"] = Predictor(cascades, device, tta)
    chosen = [c for c in discover(data).training if c.image and c.label]
    chosen = chosen[:cases] if cases else chosen
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for case in chosen:
        assert case.image is not None and case.label is not None
        truth_info = read_header(case.label)
        truth = np.asarray(read_voxels(truth_info)).astype(np.uint8)
        voxel = float(np.prod(truth_info.spacing))
        for name, predictor in members.items():
            out = predictor.predict_stages(case.image)
            rows.append(
                {"case": case.case_id, **_case_rows(f"{name} cascade", out.cascade, truth, voxel)}
            )
            rows.append(
                {"case": case.case_id, **_case_rows(f"{name} stage 1", out.liver, truth, voxel)}
            )
        image = read_voxels(read_header(case.image))
        rule = _rule(image, truth >= Label.LIVER, np.asarray(truth_info.spacing), rule_hu)
        baseline = np.where(rule, Label.TUMOUR, np.minimum(truth, Label.LIVER)).astype(np.uint8)
        rows.append(
            {
                "case": case.case_id,
                **_case_rows("threshold rule (oracle liver)", baseline, truth, voxel),
            }
        )
        print(
            case.case_id,
            {r["method"]: round(r["tumour_dice"], 3) for r in rows if r["case"] == case.case_id},
            flush=True,
        )
    return {
        "machine": f"{platform.machine()}, {available_cpus()} CPUs, {device}",
        "runs": str(runs),
        "data": str(data),
        "cases": len(chosen),
        "tta": tta,
        "seconds": round(time.perf_counter() - start, 1),
        "summary": _summary(rows),
        "rows": rows,
    }


def table(record: dict[str, Any]) -> str:
    """The summary as a markdown table."""
    lines = [
        "| method | liver Dice | tumour Dice (cases with tumour) | recall, lesions >= 10 mm "
        "| false lesions | clean tumour-free |",
        "|---|---|---|---|---|---|",
    ]
    for method, s in record["summary"].items():
        lines.append(
            f"| {method} | {s['liver_dice']:.3f} | {s['tumour_dice_cases_with_tumour']:.3f} "
            f"({s['tumour_cases']}) | {s['recall_lesions_ge_10mm']:.2f} ({s['lesions_ge_10mm']}) "
            f"| {s['false_lesions']} | {s['clean_tumour_free']:.2f} ({s['tumour_free_cases']}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs", type=Path, required=True, help="RUNS of train-all (RUNS/<model>/)."
    )
    parser.add_argument("--data", type=Path, help="Held-out dataset (imagesTr/, labelsTr/).")
    parser.add_argument("--synth", type=int, default=0, help="Render this many held-out phantoms.")
    parser.add_argument("--seed", type=int, default=9001, help="Seed of the rendered phantoms.")
    parser.add_argument("--cases", type=int, default=0, help="At most this many cases (0: all).")
    parser.add_argument(
        "--rule-hu", type=float, default=12.0, help="The rule's drop below the liver median."
    )
    parser.add_argument("--tta", action="store_true", help="Predict with flip TTA.")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    data = args.data
    if args.synth:
        from liverpipe.synth import generate_dataset

        data = Path(f"bench/out/tumours-seed{args.seed}")
        if not (data / "imagesTr").is_dir():
            generate_dataset(
                data, args.synth, seed=args.seed, size="full", workers=available_cpus()
            )
    if data is None:
        parser.error("pass --data or --synth")
    record = measure(args.runs, data, args.rule_hu, args.cases, args.tta)
    print(f"\n{record['cases']} held-out cases from {data} in {record['seconds']:.0f} s")
    print(table(record))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1, default=float))


if __name__ == "__main__":
    main()
