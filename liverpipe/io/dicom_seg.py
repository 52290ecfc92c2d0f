"""DICOM-SEG out: a predicted mask as a Segmentation that references its source series.

Written with highdicom as a BINARY segmentation with two segments, coded with SNOMED CT:
1 "Liver" (anatomical structure, liver: labels 1 and 2, tumour included) and
2 "Liver tumour" (morphologically abnormal structure, neoplasm: label 2). Each frame
references the source slice it lies on. A SEG must name the study, the series and every
source instance: when anonymisation blanked those UIDs, it is refused with a clear
message (the NIfTI mask is written all the same).

highdicom and pydicom's table of codes are imported when a SEG is written, not with
:mod:`liverpipe.io`: the preprocessing workers read scans and never write a SEG (5 MB
and 0.16 s less each).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom

from liverpipe import __version__
from liverpipe.errors import InvalidScanError
from liverpipe.io.dicom import DicomSeries
from liverpipe.labels import Label

if TYPE_CHECKING:
    import highdicom as hd
    from pydicom.sr.coding import Code

__all__ = ["segment_descriptions", "write_seg"]

_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def segment_descriptions() -> list[hd.seg.SegmentDescription]:
    """The liver and the liver-tumour segments, with their SNOMED CT codes."""
    import highdicom as hd  # noqa: PLC0415 (see the module docstring)
    from pydicom.sr.codedict import codes  # noqa: PLC0415 (see the module docstring)

    algorithm = hd.AlgorithmIdentificationSequence(
        name="liverpipe", family=codes.DCM.ArtificialIntelligence, version=__version__
    )

    def segment(number: int, label: str, category: Code, kind: Code) -> hd.seg.SegmentDescription:
        return hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )

    return [
        segment(1, "Liver", codes.SCT.AnatomicalStructure, codes.SCT.Liver),
        segment(2, "Liver tumour", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm),
    ]


def write_seg(labels: np.ndarray, series: DicomSeries, out: Path) -> Path:
    """Write ``labels`` ((column, row, slice) in the series' sorted order, as
    :func:`liverpipe.io.dicom.read_series` gives the volume) as a DICOM-SEG at ``out``.

    Raises:
        InvalidScanError: the source slices lack the UIDs a SEG must reference.
    """
    import highdicom as hd  # noqa: PLC0415 (see the module docstring)

    sources = [pydicom.dcmread(p) for p in series.files]
    blank = sorted({tag for ds in sources for tag in _UIDS if not str(ds.get(tag, "") or "")})
    if blank:
        raise InvalidScanError(
            series.folder,
            f"the slices lack {', '.join(blank)} (blanked by anonymisation?), which a "
            "DICOM-SEG must reference; the NIfTI mask is written without it",
            "assign consistent UIDs in the de-identification step, or use the NIfTI mask",
        )
    expected = (series.shape[0], series.shape[1], len(series.files))
    if labels.shape != expected:
        raise ValueError(f"labels of shape {labels.shape} for a series of {expected}")
    frames = np.ascontiguousarray(labels.transpose(2, 1, 0))  # (slice, row, column)
    masks = np.stack([frames >= Label.LIVER, frames == Label.TUMOUR], axis=-1)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(),
        series_instance_uid=hd.UID(),
        series_number=int(sources[0].get("SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="liverpipe",
        manufacturer_model_name="liverpipe",
        software_versions=__version__,
        device_serial_number="0",
        series_description="liverpipe liver and tumour",
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    seg.save_as(tmp)
    tmp.replace(out)
    return out
