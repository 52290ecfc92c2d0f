"""PNG montages of CT slices with label contours (matplotlib, Agg backend).

NumPy and matplotlib only (no torch), so that `liverpipe synth --preview` starts fast."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from liverpipe.labels import DEFAULT_HU_WINDOW, Label

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["PreviewCase", "write_montage"]

_CONTOUR_COLOURS = {Label.LIVER: "#39d353", Label.TUMOUR: "#ff4d4d"}


@dataclass(frozen=True, eq=False)
class PreviewCase:
    """A case on its canonical grid: ``hu`` and ``label`` are (Z, Y, X); spacing (x, y, z) mm."""

    name: str
    hu: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]


def _axial_index(label: np.ndarray) -> int:
    """The slice with the most tumour, else the most liver, else the middle one."""
    for value in (Label.TUMOUR, Label.LIVER):
        counts = (label == value).sum(axis=(1, 2))
        if counts.any():
            return int(counts.argmax())
    return label.shape[0] // 2


def _coronal_index(label: np.ndarray) -> int:
    counts = (label > 0).sum(axis=(0, 2))
    return int(counts.argmax()) if counts.any() else label.shape[1] // 2


def _draw(
    ax: Axes,
    image: np.ndarray,
    label: np.ndarray,
    aspect: float,
    title: str,
    window: tuple[float, float],
) -> None:
    ax.imshow(
        image, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="nearest"
    )
    for value, colour in _CONTOUR_COLOURS.items():
        mask = label >= value
        if mask.any() and not mask.all():
            ax.contour(mask.astype(np.float32), levels=[0.5], colors=colour, linewidths=0.8)
    ax.set_title(title, fontsize=7)
    ax.set_axis_off()


def write_montage(
    cases: Sequence[PreviewCase], path: Path, window: tuple[float, float] = DEFAULT_HU_WINDOW
) -> Path:
    """Write an axial (top) and coronal (bottom) montage, radiological convention.

    Axial views show the patient's right on the image's left and anterior at the top;
    coronal views show superior at the top. Liver contours are green, tumour red.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(cases)
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False, facecolor="black")
    for col, case in enumerate(cases):
        z = _axial_index(case.label)
        y = _coronal_index(case.label)
        dx, dy, dz = case.spacing
        axial = (case.hu[z, ::-1, ::-1], case.label[z, ::-1, ::-1])
        coronal = (case.hu[::-1, y, ::-1], case.label[::-1, y, ::-1])
        _draw(axes[0, col], *axial, dy / dx, f"{case.name} z={z}", window)
        _draw(axes[1, col], *coronal, dz / dx, f"coronal y={y}", window)
        for ax in axes[:, col]:
            ax.title.set_color("white")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, facecolor="black")
    plt.close(fig)
    return path
