"""The three segmentation-models-pytorch architectures, behind one factory."""

from __future__ import annotations

from typing import Final

import segmentation_models_pytorch as smp
import torch

from liverpipe.errors import LiverpipeError
from liverpipe.labels import NUM_CLASSES
from liverpipe.settings import TrainConfig

__all__ = [
    "MODELS",
    "ModelWeightsError",
    "build_model",
    "decoder_options",
    "model_for",
    "pick_device",
]

#: Registry: CLI / config name -> smp architecture name.
MODELS: Final[dict[str, str]] = {
    "unetplusplus": "unetplusplus",
    "manet": "manet",
    "deeplabv3plus": "deeplabv3plus",
}


class ModelWeightsError(LiverpipeError):
    """Pretrained encoder weights were asked for but cannot be had (offline)."""


def decoder_options(name: str, depth: int, width: int) -> dict[str, object]:
    """smp keyword arguments for an encoder of ``depth`` stages and a decoder of ``width``
    channels at its deepest level (halved at each finer one for UNet++ and MAnet).

    The defaults (5, 256) are smp's own; smaller ones make CPU training several times
    faster (a 64 x 64 step of MAnet/resnet18 takes 180 ms at (4, 128), 295 ms at (5, 256)).
    """
    if name == "deeplabv3plus":
        return {"encoder_depth": depth, "decoder_channels": width}
    return {
        "encoder_depth": depth,
        "decoder_channels": tuple(max(width >> i, 8) for i in range(depth)),
    }


def model_for(cfg: TrainConfig, encoder_weights: str | None = None) -> torch.nn.Module:
    """The network a stage's config describes (one logit per label); ``encoder_weights``
    as in :func:`build_model` (training passes the config's, loading a checkpoint none)."""
    return build_model(
        cfg.model,
        encoder=cfg.encoder,
        in_channels=cfg.context_slices,
        encoder_weights=encoder_weights,
        depth=cfg.encoder_depth,
        width=cfg.decoder_width,
    )


def build_model(
    name: str,
    *,
    encoder: str = "resnet34",
    in_channels: int = 3,
    classes: int = NUM_CLASSES,
    encoder_weights: str | None = None,
    depth: int = 5,
    width: int = 256,
) -> torch.nn.Module:
    """Build ``unetplusplus``, ``manet`` or ``deeplabv3plus`` with smp.

    ``in_channels`` is the number of adjacent slices (2.5D input); the output has
    ``classes`` logits per pixel; ``depth`` and ``width`` size the network
    (:func:`decoder_options`). ``encoder_weights=None`` (the default) needs no network;
    asking for pretrained weights that are not cached fails with a clear error.
    """
    key = name.lower()
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    try:
        return smp.create_model(
            MODELS[key],
            encoder_name=encoder,
            encoder_weights=encoder_weights,
            in_channels=in_channels,
            classes=classes,
            **decoder_options(key, depth, width),  # type: ignore[arg-type]
        )
    except KeyError as err:
        raise ValueError(f"unknown encoder {encoder!r} for {name}: {err}") from err
    except (OSError, RuntimeError, ValueError) as err:
        if encoder_weights is None:
            raise
        raise ModelWeightsError(
            None,
            f"pretrained weights {encoder_weights!r} for encoder {encoder!r} could not be loaded "
            f"({type(err).__name__}); there is no network here and they are not in the cache",
            "train with encoder_weights = none (the default), or copy the weights into the "
            "Hugging Face cache (HF_HOME) on a machine with network access first",
        ) from err


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU; or a torch name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
