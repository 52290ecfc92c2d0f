"""A trained cascade applied to a scan: sliding 2.5D windows over a volume, stage 1 then
the tumour stage in the liver's box, the mapping back onto the scan's own grid, the
measurements, and the ``Predictor`` that writes masks (NIfTI and DICOM-SEG).
"""

from __future__ import annotations

from liverpipe.infer.cascade import (
    CascadeResult,
    StageModels,
    decide,
    largest_liver,
    liver_stage,
    tumour_stage,
)
from liverpipe.infer.measure import longest_axial_diameter, measure
from liverpipe.infer.predict import (
    PostProcess,
    Predictor,
    StagePrediction,
    check_output,
    predict_dicom,
    predict_file,
    predict_path,
    write_labels,
)
from liverpipe.infer.volume import (
    PreparedScan,
    drop_small_lesions,
    keep_largest_liver,
    keep_seeded_lesions,
    native_labels,
    pool,
    pool_labels,
    predict_probabilities,
    prepare_scan,
    to_native,
    tta_flips,
    tumour_inside_liver,
    unpool,
    volume_batches,
)

__all__ = [
    "CascadeResult",
    "PostProcess",
    "Predictor",
    "PreparedScan",
    "StageModels",
    "StagePrediction",
    "check_output",
    "decide",
    "drop_small_lesions",
    "keep_largest_liver",
    "keep_seeded_lesions",
    "largest_liver",
    "liver_stage",
    "longest_axial_diameter",
    "measure",
    "native_labels",
    "pool",
    "pool_labels",
    "predict_dicom",
    "predict_file",
    "predict_path",
    "predict_probabilities",
    "prepare_scan",
    "to_native",
    "tta_flips",
    "tumour_inside_liver",
    "tumour_stage",
    "unpool",
    "volume_batches",
    "write_labels",
]
