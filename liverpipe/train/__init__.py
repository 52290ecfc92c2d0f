"""Training from the slice store: sampling and the streaming/resident sources,
augmentation (with synthetic lesions for the tumour stage), the training loop with its
validation and stage-specific parts, a time budget that caps a job's steps, and the
launcher that trains every model of a run (``python -m liverpipe.train`` is one job).
"""

from __future__ import annotations

from liverpipe.train.augment import augment_batch
from liverpipe.train.budget import StepBudget, StepCap
from liverpipe.train.launch import (
    STAGES,
    JobSlot,
    ModelOutcome,
    job_cost,
    job_slots,
    parse_gpus,
    read_result,
    start_run,
    train_all,
    visible_gpus,
)
from liverpipe.train.lesions import Lesion, draw_lesions, implant_lesions
from liverpipe.train.loop import TrainResult, lr_factor, train
from liverpipe.train.sampling import (
    ResidentSource,
    RoiSource,
    SliceSampler,
    SliceTable,
    StreamingSource,
    decode_scale,
)
from liverpipe.train.stages import (
    THRESHOLDS,
    Source,
    make_source,
    pick_threshold,
    prepare_batch,
    resolve_steps,
    stage_table,
    tune_threshold,
    validate,
)

__all__ = [
    "STAGES",
    "THRESHOLDS",
    "JobSlot",
    "Lesion",
    "ModelOutcome",
    "ResidentSource",
    "RoiSource",
    "SliceSampler",
    "SliceTable",
    "Source",
    "StepBudget",
    "StepCap",
    "StreamingSource",
    "TrainResult",
    "augment_batch",
    "decode_scale",
    "draw_lesions",
    "implant_lesions",
    "job_cost",
    "job_slots",
    "lr_factor",
    "make_source",
    "parse_gpus",
    "pick_threshold",
    "prepare_batch",
    "read_result",
    "resolve_steps",
    "stage_table",
    "start_run",
    "train",
    "train_all",
    "tune_threshold",
    "validate",
    "visible_gpus",
]
