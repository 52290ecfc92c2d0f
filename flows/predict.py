"""``predict``: masks and measurements for new scans with the champion, one run or an ensemble."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from liverpipe.errors import LiverpipeError
from liverpipe.infer import Predictor, predict_path
from liverpipe.models import expand_models, load_cascade, pick_device
from liverpipe.ops import champion_models

__all__ = ["predict_scans"]


@flow(name="predict", log_prints=True)
def predict_scans(
    source: str,
    output: str,
    models: list[str] | None = None,
    runs: str = "runs",
    tta: bool = False,
) -> dict[str, Any]:
    """Predict SOURCE (a scan or a folder) into OUTPUT with the ensemble champion of RUNS,
    or with MODELS (model folders RUNS/<run_id>/<model>, or runs RUNS/<run_id>; several
    are ensembled). Each mask's JSON names the model version."""
    device = pick_device()
    folders = expand_models([Path(m) for m in models]) if models else champion_models(Path(runs))
    predictor = Predictor([load_cascade(m, device) for m in folders], device, tta)
    results = predict_path(predictor, Path(source), Path(output))
    rows = []
    for scan, outcome in results.items():
        if isinstance(outcome, Exception):
            get_run_logger().warning("%s", outcome)
            rows.append(
                {
                    "scan": scan.name,
                    "mask": "",
                    "liver_ml": "",
                    "lesions": "",
                    "error": str(outcome),
                }
            )
        else:
            rows.append(
                {
                    "scan": scan.name,
                    "mask": outcome["mask"],
                    "liver_ml": f"{outcome['liver_volume_ml']:.1f}",
                    "lesions": str(outcome["tumour_count"]),
                    "error": "",
                }
            )
    create_table_artifact(rows, key="liverpipe-predictions", description=f"{source} -> {output}")
    failed = [str(s) for s, r in results.items() if isinstance(r, Exception)]
    if failed:  # the masks of the other scans are written; the run ends failed
        raise LiverpipeError(
            Path(source),
            f"{len(failed)} of {len(results)} scan(s) failed: {', '.join(failed)}",
            "see each scan's problem and fix in the warnings above or the artifact",
        )
    return {"predicted": len(results), "failed": failed}
