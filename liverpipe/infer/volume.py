"""Prediction kernels: preprocess a scan as its store did, predict, map back, clean up.

The forward path is the store's own (:func:`liverpipe.preprocess.forward.forward_case`), so a model
sees exactly what it was trained on. The way back resamples labels from the model grid
onto the scan's canonical grid the way the store resampled them on the way in (one-hot
linear by default, so borders follow the tissue instead of the model grid's blocks),
then undoes the reorientation exactly: the mask has the scan's shape and overlays it
voxel for voxel.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cc3d
import numpy as np
import torch

from liverpipe.geometry import CanonicalGeometry, from_canonical
from liverpipe.io import NiftiInfo
from liverpipe.labels import FLIP_DIMS, NUM_CLASSES, Label
from liverpipe.preprocess import FovReport, Grid, ZScoreStats, forward_case, resample_label
from liverpipe.roi import bounding_box
from liverpipe.settings import STRIDE, CheckConfig, PreprocessConfig
from storage import window_indices

__all__ = [
    "PreparedScan",
    "drop_small_lesions",
    "keep_largest_liver",
    "keep_seeded_lesions",
    "native_labels",
    "pool",
    "pool_labels",
    "predict_probabilities",
    "prepare_scan",
    "to_native",
    "tta_flips",
    "tumour_inside_liver",
    "unpool",
    "volume_batches",
]


def volume_batches(
    image: np.ndarray, context: int, device: torch.device, batch: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, stacks)`` over a (Z, Y, X) volume: (B, context, Y, X) 2.5D inputs of
    slices ``start .. start + B``, edges replicated (the training input, for inference)."""
    depth = image.shape[0]
    volume = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).to(device)
    for start in range(0, depth, batch):
        zs = range(start, min(start + batch, depth))
        index = torch.from_numpy(np.stack([window_indices(z, context, depth) for z in zs]))
        yield start, volume[index.to(device)]


@dataclass(frozen=True, eq=False)
class PreparedScan:
    """A scan on its model grid, normalised, with what is needed to map back.

    The model grid is the store's grid, widened in-plane when the body reaches beyond
    the stored crop; ``window`` is the (Y, X) part of it that the store's grid covers.
    """

    info: NiftiInfo
    geometry: CanonicalGeometry
    grid: Grid
    image: np.ndarray  # (Z, Y, X) float32, normalised and decoded as the trainer reads it
    window: tuple[slice, slice]
    fov: FovReport
    warnings: tuple[str, ...] = ()
    source: np.ndarray | None = None  # the file's own voxels, when asked to keep them


def prepare_scan(
    path: Path,
    config: PreprocessConfig,
    zscore: ZScoreStats | None = None,
    limits: CheckConfig | None = None,
    keep_source: bool = False,
    cover_body: bool = True,
) -> PreparedScan:
    """Read, validate and preprocess one scan through the store's forward path.

    ``cover_body`` widens the grid when the body reaches beyond the stored crop, so that
    no tissue is left out of the prediction; ``keep_source`` keeps the decoded file
    voxels (for overlays).
    """
    case = forward_case(
        path, None, config, zscore, limits, cover_body=cover_body, keep_source=keep_source
    )
    return PreparedScan(
        case.info,
        case.geometry,
        case.grid,
        case.decoded(),
        case.window,
        case.fov,
        case.warnings,
        case.source,
    )


def tta_flips(axes: Sequence[str]) -> list[tuple[int, ...]]:
    """Every combination of mirroring ``axes`` ("lr", "ap"), the identity first."""
    dims = [FLIP_DIMS[a] for a in axes]
    return [tuple(d for i, d in enumerate(dims) if mask >> i & 1) for mask in range(2 ** len(dims))]


def pool(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Average (B, C, Y, X) images down by ``factor``, padding Y and X with each image's
    minimum (air) up to a multiple of ``factor * STRIDE`` first."""
    if factor == 1:
        return images
    _, _, height, width = images.shape
    unit = factor * STRIDE
    pad_y, pad_x = -height % unit, -width % unit
    if pad_y or pad_x:
        low = images.amin(dim=(1, 2, 3), keepdim=True)
        padded = torch.nn.functional.pad(images - low, (0, pad_x, 0, pad_y)) + low
    else:
        padded = images
    return torch.nn.functional.avg_pool2d(padded, factor)


def unpool(probs: torch.Tensor, factor: int, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear inverse of :func:`pool` for (B, C, y, x) probabilities, cropped to ``size``."""
    if factor == 1:
        return probs
    up = torch.nn.functional.interpolate(
        probs, scale_factor=factor, mode="bilinear", align_corners=False
    )
    return up[:, :, : size[0], : size[1]]


def pool_labels(labels: torch.Tensor, factor: int, classes: int = NUM_CLASSES) -> torch.Tensor:
    """(B, Y, X) labels down by ``factor``: the majority label of each block."""
    if factor == 1:
        return labels
    onehot = torch.nn.functional.one_hot(labels, classes).permute(0, 3, 1, 2).float()
    return torch.nn.functional.avg_pool2d(onehot, factor).argmax(1)


@torch.no_grad()
def predict_probabilities(
    models: Sequence[torch.nn.Module],
    image: np.ndarray,
    context: int,
    device: torch.device,
    *,
    batch: int = 16,
    flips: Sequence[tuple[int, ...]] = ((),),
    downsample: int = 1,
) -> np.ndarray:
    """Mean softmax (C, Z, Y, X) float32 over ``models`` (an ensemble) and ``flips`` (TTA).

    2.5D: slice z is predicted from its ``context`` neighbours as channels (edges
    replicated). Each flip mirrors the given dims of the (B, C, Y, X) input, and the
    output back (:func:`tta_flips`). ``downsample`` > 1 (the liver stage) predicts on
    slices averaged down by that factor and interpolates the softmax back up.
    """
    autocast = device.type == "cuda"
    total: np.ndarray | None = None
    for model in models:
        model.eval()
        for start, stacks in volume_batches(image, context, device, batch):
            probs = torch.zeros((), device=device)
            for dims in flips:
                x = stacks.flip(dims) if dims else stacks
                # channels_last, as the trainer runs: 1.25x faster on the CPU here
                x_in = pool(x, downsample).contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    logits = model(x_in).float()
                p = unpool(logits.softmax(1), downsample, (x.shape[2], x.shape[3]))
                probs = probs + (p.flip(dims) if dims else p)
            chunk = (probs / len(flips)).permute(1, 0, 2, 3).cpu().numpy()
            if total is None:
                total = np.zeros((chunk.shape[0], *image.shape), dtype=np.float32)
            total[:, start : start + len(stacks)] += chunk
    assert total is not None, "no models given"
    return total / len(models)


def to_native(
    stored_labels: np.ndarray, scan: PreparedScan, interpolation: str = "label_linear"
) -> np.ndarray:
    """Labels on the stored grid -> the scan's canonical (Z, Y, X) grid.

    ``interpolation`` is the store's ``label_interpolation``: "label_linear" interpolates
    the nested masks liver and tumour linearly and keeps each where it reaches one half
    (:func:`~liverpipe.preprocess.resample_label`), so a 2 mm prediction comes back to a
    0.7 mm scan with smooth borders, not in 2 mm steps; "nearest" is nearest neighbour.
    On the same grid both give the labels back unchanged.

    Outside the stored in-plane crop the labels are background. In z the stored grid has
    ``round(extent / spacing)`` slices, so the scan's first and last slices can sit up to
    half a stored slice beyond it: the end slices are repeated once so that they take the
    nearest stored slice's labels, not the background. ``from_canonical`` then gives the
    file's own (i, j, k) order.
    """
    target = Grid(scan.geometry.canonical_shape, scan.geometry.canonical_affine, (0, 0, 0))
    padded = np.pad(
        np.asarray(stored_labels, dtype=np.uint8), ((1, 1), (0, 0), (0, 0)), mode="edge"
    )
    shift = np.eye(4)
    shift[2, 3] = -1.0  # padded slice 0 is stored slice -1
    return resample_label(padded, scan.grid.affine @ shift, target, interpolation)


def keep_largest_liver(labels: np.ndarray) -> np.ndarray:
    """Keep only the largest 26-connected component of liver (labels 1 and 2), found
    within the liver's bounding box (a native grid has many times more voxels).

    Outside that box every voxel is background already, so only the box is touched."""
    out = np.array(labels, dtype=np.uint8)  # a copy: the input is left as it was
    box = bounding_box(out)  # liver is every non-zero label
    if box is None:
        return out
    inside = out[box]
    largest = cc3d.largest_k(np.ascontiguousarray(inside >= Label.LIVER), k=1, connectivity=26)
    inside[largest == 0] = 0
    return out


def tumour_inside_liver(labels: np.ndarray) -> np.ndarray:
    """Drop tumour that lies in a component of (1 or 2) with no liver parenchyma (1)."""
    foreground = np.ascontiguousarray(labels >= Label.LIVER)
    components = cc3d.connected_components(foreground, connectivity=26)
    with_liver = np.unique(components[labels == Label.LIVER])
    orphan = (labels == Label.TUMOUR) & ~np.isin(components, with_liver)
    out = labels.copy()
    out[orphan] = 0
    return out


def keep_seeded_lesions(labels: np.ndarray, tumour_probs: np.ndarray, seed: float) -> np.ndarray:
    """Hysteresis on lesions: turn tumour components (26-connected) whose tumour
    probability never reaches ``seed`` into liver.

    A lesion with a confident core is kept whole, down to the tumour threshold at its
    border, while faint blobs that never reach ``seed`` (most false alarms) go. A
    ``seed`` at or below the tumour threshold keeps everything.
    """
    tumour = np.ascontiguousarray(labels == Label.TUMOUR)
    if not tumour.any():
        return labels
    components = cc3d.connected_components(tumour, connectivity=26)
    seeded = np.unique(components[tumour & (tumour_probs >= seed)])
    out = labels.copy()
    out[tumour & ~np.isin(components, seeded)] = Label.LIVER
    return out


def drop_small_lesions(labels: np.ndarray, voxel_mm3: float, min_mm3: float) -> np.ndarray:
    """Turn tumour components (26-connected) smaller than ``min_mm3`` into liver."""
    if min_mm3 <= 0:
        return labels
    tumour = np.ascontiguousarray(labels == Label.TUMOUR)
    if not tumour.any():
        return labels
    kept = cc3d.dust(tumour, threshold=max(1, int(np.ceil(min_mm3 / voxel_mm3))), connectivity=26)
    out = labels.copy()
    out[tumour & ~kept] = Label.LIVER
    return out


def native_labels(
    model_labels: np.ndarray,
    scan: PreparedScan,
    largest_liver: bool,
    tumour_in_liver: bool,
    min_lesion_mm3: float = 0.0,
    interpolation: str = "label_linear",
) -> np.ndarray:
    """Model-grid labels -> post-processed labels in the file's (i, j, k) order
    (``interpolation``: see :func:`to_native`).

    Post-processing runs on the model grid, before the labels go back to the scan's grid
    (many times fewer voxels than a sub-millimetre scan): the largest liver component,
    tumour only where it touches liver, and no lesion under ``min_lesion_mm3``. The
    linear way back can part a bridge one model voxel thin, so the largest liver
    component is kept once more on the scan's grid.
    """
    labels = np.asarray(model_labels, dtype=np.uint8)
    if largest_liver:
        labels = keep_largest_liver(labels)
    if tumour_in_liver:
        labels = tumour_inside_liver(labels)
    voxel_mm3 = float(np.prod(scan.grid.spacing))
    labels = drop_small_lesions(labels, voxel_mm3, min_lesion_mm3)
    native = to_native(labels, scan, interpolation)
    if largest_liver and interpolation != "nearest":
        native = keep_largest_liver(native)
    return from_canonical(native, scan.geometry)
