"""Single source of truth for label ids, the CT window and axis conventions."""

from __future__ import annotations

from enum import IntEnum
from typing import Final

__all__ = ["DEFAULT_HU_WINDOW", "FLIP_DIMS", "LABEL_NAMES", "NUM_CLASSES", "Label"]


class Label(IntEnum):
    """Voxel label values of the Task03_Liver / LiTS convention."""

    BACKGROUND = 0
    LIVER = 1
    TUMOUR = 2


#: Output channels of every model: one logit per label value.
NUM_CLASSES: Final[int] = len(Label)


#: Names written to ``dataset.json`` and reports, keyed by label value.
LABEL_NAMES: Final[dict[int, str]] = {
    Label.BACKGROUND: "background",
    Label.LIVER: "liver",
    Label.TUMOUR: "tumour",
}

#: Abdominal CT display and normalisation window in Hounsfield units (low, high).
DEFAULT_HU_WINDOW: Final[tuple[float, float]] = (-200.0, 250.0)

#: Mirroring axes by name -> the dim they flip in a (B, C, Y, X) batch of canonical slices:
#: "lr" mirrors columns (patient left-right), "ap" rows (front-back). Augmentation and
#: test-time augmentation both use this table.
FLIP_DIMS: Final[dict[str, int]] = {"lr": 3, "ap": 2}
