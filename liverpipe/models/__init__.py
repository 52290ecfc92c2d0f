"""The trained models as artefacts: the three smp architectures, checkpoints, and the
run folders that inference, evaluation and promotion load them from.
"""

from __future__ import annotations

from liverpipe.models.architectures import (
    MODELS,
    ModelWeightsError,
    build_model,
    decoder_options,
    model_for,
    pick_device,
)
from liverpipe.models.checkpoint import CheckpointMismatchError, load_checkpoint, save_checkpoint
from liverpipe.models.runs import (
    Cascade,
    Run,
    expand_models,
    find_models,
    hu_per_unit,
    load_cascade,
    load_run,
)

__all__ = [
    "MODELS",
    "Cascade",
    "CheckpointMismatchError",
    "ModelWeightsError",
    "Run",
    "build_model",
    "decoder_options",
    "expand_models",
    "find_models",
    "hu_per_unit",
    "load_cascade",
    "load_checkpoint",
    "load_run",
    "model_for",
    "pick_device",
    "save_checkpoint",
]
