"""Batch augmentation on the training device: torch ops on whole batches.

Image and label share one spatial transform (rotation, zoom, optional elastic field)
through ``affine_grid`` / ``grid_sample``, and the same random mirroring
(``flip_axes``); labels use nearest sampling. Intensity
changes touch the image only. Every random draw comes from the given generator, so a
seeded generator gives the same batch twice.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from liverpipe.labels import FLIP_DIMS
from liverpipe.settings import AugmentConfig

__all__ = ["augment_batch"]


def _uniform(
    gen: torch.Generator, n: int, low: float, high: float, device: torch.device
) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (high - low) + low


def _spatial_grid(
    cfg: AugmentConfig, n: int, size: tuple[int, int], gen: torch.Generator, device: torch.device
) -> torch.Tensor | None:
    if cfg.rotate_deg == 0 and cfg.scale == (1.0, 1.0) and not cfg.elastic:
        return None
    angle = _uniform(gen, n, -cfg.rotate_deg, cfg.rotate_deg, device) * (math.pi / 180)
    zoom = _uniform(gen, n, cfg.scale[0], cfg.scale[1], device)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    zeros = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
    grid = F.affine_grid(theta, [n, 1, *size], align_corners=False)
    if cfg.elastic and cfg.elastic_px > 0:
        coarse = torch.randn(n, 2, 6, 6, generator=gen, device=device)
        field = F.interpolate(coarse, size=size, mode="bicubic", align_corners=False)
        scale = torch.tensor(
            [2 * cfg.elastic_px / size[1], 2 * cfg.elastic_px / size[0]], device=device
        )
        grid = grid + field.permute(0, 2, 3, 1) * scale
    return grid


def augment_batch(
    images: torch.Tensor, labels: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment images (B, C, Y, X) float and labels (B, Y, X) int64 on their device."""
    n, _, height, width = images.shape
    device = images.device
    grid = _spatial_grid(cfg, n, (height, width), gen, device)
    if grid is not None:
        low = images.amin(dim=(1, 2, 3), keepdim=True)  # pad with each image's background
        images = (
            F.grid_sample(
                images - low, grid, mode="bilinear", padding_mode="zeros", align_corners=False
            )
            + low
        )
        labels = (
            F.grid_sample(
                labels[:, None].float(),
                grid,
                mode="nearest",
                padding_mode="zeros",
                align_corners=False,
            )
            .squeeze(1)
            .long()
        )
    for axis in cfg.flip_axes:  # mirroring, as TTA undoes it (labels.FLIP_DIMS)
        dim = FLIP_DIMS[axis]
        chosen = torch.rand(n, generator=gen, device=device) < cfg.flip_probability
        images = torch.where(chosen.view(n, 1, 1, 1), images.flip(dim), images)
        labels = torch.where(chosen.view(n, 1, 1), labels.flip(dim - 1), labels)
    if cfg.gamma != (1.0, 1.0):
        gamma = _uniform(gen, n, *cfg.gamma, device).view(n, 1, 1, 1)
        low = images.amin(dim=(1, 2, 3), keepdim=True)
        span = (images.amax(dim=(1, 2, 3), keepdim=True) - low).clamp(min=1e-6)
        images = ((images - low) / span).pow(gamma) * span + low
    if cfg.intensity_scale or cfg.intensity_shift:
        scale = _uniform(gen, n, 1 - cfg.intensity_scale, 1 + cfg.intensity_scale, device).view(
            n, 1, 1, 1
        )
        shift = _uniform(gen, n, -cfg.intensity_shift, cfg.intensity_shift, device).view(n, 1, 1, 1)
        images = images * scale + shift
    if cfg.noise_std > 0:
        images = images + torch.randn(images.shape, generator=gen, device=device) * cfg.noise_std
    return images, labels
