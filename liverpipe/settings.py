"""Typed, frozen configuration, built once at the edge (CLI or flow).

Precedence, lowest to highest: model defaults, the TOML file given with ``--config``,
``LIVERPIPE_<SECTION>__<FIELD>`` environment variables, explicit CLI overrides.
Nothing here reads the environment at import time.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from liverpipe.errors import ConfigError

__all__ = [
    "MIN_SLICE_SIZE",
    "STRIDE",
    "TUMOUR_SEED",
    "TUMOUR_THRESHOLD",
    "AugmentConfig",
    "CheckConfig",
    "EvaluateConfig",
    "IngestConfig",
    "ModelName",
    "PreprocessConfig",
    "RegistryConfig",
    "Settings",
    "Stage",
    "StoreConfig",
    "SynthConfig",
    "TrainAllConfig",
    "TrainConfig",
    "TumourAugmentConfig",
    "TumourConfig",
    "load_settings",
]

ENV_PREFIX = "LIVERPIPE_"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CheckConfig(_Frozen):
    """Limits applied when validating NIfTI inputs (``liverpipe check``)."""

    max_dim: int = Field(2048, ge=1, description="Largest allowed size of any voxel axis.")
    max_voxels: int = Field(
        1024 * 1024 * 2048, ge=1, description="Largest allowed voxel count of one volume."
    )
    affine_tolerance_mm: float = Field(
        1e-3, gt=0, description="Largest allowed distance (mm) between image and label grids."
    )
    workers: int = Field(0, ge=0, description="Reader threads; 0 means one per CPU core.")
    min_slices: int = Field(
        3,
        ge=1,
        description="Fewer axial slices than this are refused (at least the 2.5D context). "
        "A scan must also span at least one stored slice ([preprocess] target_spacing z).",
    )
    max_lowest_hu: float | None = Field(
        -50.0,
        description="A CT in HU holds fat (about -100 HU) and air (about -1000 HU): a scan "
        "with no voxel below this value is refused as not in HU (stored without its rescale "
        "intercept, normalised, 8-bit, blank, or a label map). None turns the check off.",
    )
    label_outside_crop: Literal["refuse", "warn"] = Field(
        "refuse",
        description="A labelled voxel outside the stored in-plane crop ([preprocess] "
        "slice_size) would be lost from training: refuse the case, or store it with a warning.",
    )


class SynthConfig(_Frozen):
    """Defaults of the phantom generator (``liverpipe synth``)."""

    size: Literal["small", "full"] = Field("small", description="Grid size preset.")
    seed: int = Field(0, ge=0, description="Random seed; the same seed gives the same bytes.")


class PreprocessConfig(_Frozen):
    """How a scan becomes a stored case (``liverpipe preprocess``).

    Every field is part of the config hash recorded with each case: changing any of
    them reprocesses every case.
    """

    target_spacing: tuple[float, float, float] = Field(
        (1.0, 1.0, 2.5), description="Voxel size (x, y, z) in mm of the stored grid."
    )
    slice_size: tuple[int, int] = Field(
        (384, 384), description="In-plane size (Y, X) of stored slices, centred on the body."
    )
    image_interpolation: Literal["linear", "bspline"] = Field(
        "linear", description="SimpleITK interpolator for CT intensities."
    )
    label_interpolation: Literal["label_linear", "nearest"] = Field(
        "label_linear",
        description="label_linear: one-hot linear (keeps small tumours, smooth borders); "
        "nearest: nearest neighbour.",
    )
    body_threshold_hu: float = Field(-500.0, description="HU above which a voxel is body.")
    normalization: Literal["window", "zscore"] = Field(
        "window",
        description="window: clip to hu_window and scale to [0, 1]; zscore: clip to the "
        "dataset's foreground percentiles, then z-score (nnU-Net CT scheme).",
    )
    hu_window: tuple[float, float] = Field(
        (-200.0, 250.0), description="HU window (low, high) for normalization='window'."
    )
    zscore_percentiles: tuple[float, float] = Field(
        (0.5, 99.5), description="Foreground percentiles used to clip before z-scoring."
    )
    storage_dtype: Literal["float16", "uint8"] = Field(
        "float16", description="Stored image dtype; uint8 quantises the normalised range."
    )
    split_fractions: tuple[float, float, float] = Field(
        (0.7, 0.15, 0.15), description="Train, val, test fractions, assigned by case-id hash."
    )
    split_salt: str = Field("liverpipe", description="Salt of the case-id hash for splits.")

    @model_validator(mode="after")
    def _check(self) -> PreprocessConfig:
        if min(self.target_spacing) <= 0 or min(self.slice_size) < MIN_SLICE_SIZE:
            raise ValueError(f"target_spacing must be > 0 and slice_size at least {MIN_SLICE_SIZE}")
        if self.hu_window[0] >= self.hu_window[1]:
            raise ValueError("hu_window must be (low, high) with low < high")
        if not math.isclose(sum(self.split_fractions), 1.0) or min(self.split_fractions) < 0:
            raise ValueError("split_fractions must be non-negative and sum to 1")
        return self


class StoreConfig(_Frozen):
    """Runtime options of preprocessing runs; not part of the config hash."""

    workers: int = Field(0, ge=0, description="Dask workers; 0 means one per CPU core.")
    dask_address: str | None = Field(
        None,
        description="tcp://host:port of an existing Dask scheduler; None starts a LocalCluster.",
    )
    stale_lock_seconds: float = Field(
        0.0,
        ge=0,
        description="Also treat a lock from another host as stale after this age (0: never).",
    )


class AugmentConfig(_Frozen):
    """On-device batch augmentation; set a magnitude to 0 (or False) to turn it off."""

    rotate_deg: float = Field(15.0, ge=0, le=180, description="Max in-plane rotation (degrees).")
    scale: tuple[float, float] = Field((0.85, 1.15), description="Zoom range; (1, 1) turns it off.")
    elastic: bool = Field(False, description="Smooth random elastic deformation.")
    elastic_px: float = Field(4.0, ge=0, description="Elastic displacement amplitude in pixels.")
    intensity_scale: float = Field(
        0.1, ge=0, description="Random multiplicative factor 1 +/- this."
    )
    intensity_shift: float = Field(0.1, ge=0, description="Random additive shift +/- this.")
    gamma: tuple[float, float] = Field((0.8, 1.25), description="Gamma range; (1, 1) turns it off.")
    noise_std: float = Field(0.03, ge=0, description="Gaussian noise std (normalised units).")
    flip_axes: tuple[Literal["lr", "ap"], ...] = Field(
        ("lr", "ap"),
        description="Random mirroring: lr (left-right) and/or ap (front-back); () turns it "
        "off. predict --tta averages exactly these flips.",
    )
    flip_probability: float = Field(0.5, ge=0, le=1, description="Chance of each flip.")


class TumourAugmentConfig(AugmentConfig):
    """Stage 2's augmentation: as ``[train.augment]`` but no intensity shift or gamma.

    Stage 2 reads HU relative to the liver's median, so 0 means "like the liver". An
    additive shift (0.1 is 15 HU) or a gamma curve (up to 30 HU at the liver) moves that
    anchor by as much as a tumour's contrast (12-38 HU on the phantoms); scaling keeps it.
    Without them, per-case tumour Dice on 24 held-out phantoms rose from 0.34 to 0.45
    (MAnet, 450 steps; docs/benchmarks.md).
    """

    intensity_shift: float = Field(
        0.0, ge=0, description="Random additive shift +/- this (moves the liver anchor)."
    )
    gamma: tuple[float, float] = Field(
        (1.0, 1.0), description="Gamma range; (1, 1) turns it off (it moves the liver anchor)."
    )
    lesions: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Chance that a training crop gets synthetic hypodense lesions painted "
        "into its liver (tumour synthesis, Hu et al. CVPR 2023); 0 turns it off.",
    )
    lesion_count: tuple[int, int] = Field(
        (1, 3), description="Synthetic lesions per chosen crop: at least, at most."
    )
    lesion_diameter_mm: tuple[float, float] = Field(
        (5.0, 40.0), description="Synthetic lesion diameters (mm), drawn log-uniformly."
    )
    lesion_contrast_hu: tuple[float, float] = Field(
        (10.0, 45.0), description="How much darker than the liver a synthetic lesion is (HU)."
    )
    lesion_border: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Chance that a synthetic lesion is centred on the liver's surface "
        "(subcapsular, cut by the organ's outline) rather than anywhere in it.",
    )
    lesion_rim: float = Field(
        0.3, ge=0, le=1, description="Chance that a synthetic lesion has a bright rim."
    )
    lesion_rim_min_mm: float = Field(
        10.0, ge=0, description="Only lesions larger than this (mm) get a rim."
    )

    @model_validator(mode="after")
    def _check_lesions(self) -> TumourAugmentConfig:
        low, high = self.lesion_count
        if not 1 <= low <= high:
            raise ValueError(
                "lesion_count must be (at least, at most) with 1 <= at least <= at most"
            )
        for name in ("lesion_diameter_mm", "lesion_contrast_hu"):
            a, b = getattr(self, name)
            if not 0 < a <= b:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high")
        return self


#: Total stride of the encoders (5 halvings): network inputs are multiples of it.
STRIDE = 32
#: The smallest stored slice side.
MIN_SLICE_SIZE = 8
#: Prediction's default lesion hysteresis: a predicted tumour component is kept only where
#: its tumour probability reaches this somewhere (``PostProcess.tumour_seed``).
TUMOUR_SEED = 0.99
#: Prediction's default tumour threshold: a seeded lesion's extent, where the tumour
#: probability reaches this (``PostProcess.tumour_threshold``; None: each run's val-tuned
#: threshold). Fixed rather than tuned: with the seed, tuning on a handful of val cases
#: scored below 0.5 on held-out phantoms (docs/benchmarks.md).
TUMOUR_THRESHOLD = 0.5

Stage = Literal["liver", "tumour"]

#: The three smp architectures liverpipe trains (``liverpipe config`` refuses others).
ModelName = Literal["unetplusplus", "manet", "deeplabv3plus"]


class TrainConfig(_Frozen):
    """Training of one model of one stage (``liverpipe train``).

    ``[train]`` configures stage 1 (the liver, on whole slices read downsampled),
    ``[tumour]`` stage 2 (liver and tumour inside the liver's bounding box at the store's
    full in-plane resolution). Both sections take every field; each stage uses its own.
    """

    stage: Stage = Field(
        "liver",
        description="liver: whole slices, coarse (stage 1); tumour: crops of the liver's "
        "bounding box at full resolution (stage 2). Set by the section.",
    )
    model: ModelName = Field("unetplusplus", description="unetplusplus, manet or deeplabv3plus.")
    encoder: str = Field("resnet34", description="smp encoder name.")
    encoder_weights: str | None = Field(
        None, description="None (default, offline) or e.g. 'imagenet' if cached locally."
    )
    encoder_depth: int = Field(
        5, ge=3, le=5, description="Encoder stages (smp encoder_depth); fewer is faster."
    )
    decoder_width: int = Field(
        256,
        ge=16,
        description="Decoder channels at its deepest level (smp's default 256); halved at "
        "each finer level for UNet++ and MAnet.",
    )
    context_slices: int = Field(3, ge=1, description="k adjacent slices as channels (odd).")
    steps: int = Field(2000, ge=1, description="Optimiser steps (unless epochs is set).")
    epochs: float | None = Field(
        None,
        gt=0,
        description="Training length in epochs over the train split (its slices; for the "
        "tumour stage, its slices inside the liver's bounding box); overrides steps.",
    )
    max_minutes: float | None = Field(
        None,
        gt=0,
        description="Time budget of the training steps: after 35 steps the job caps its "
        "steps once to what fits at its measured speed, and the schedule decays over the "
        "cap (validation runs outside it; a resume keeps the cap). None: no budget.",
    )
    downsample: int = Field(
        1,
        ge=1,
        le=8,
        description="Liver stage: slices are read averaged down by this factor on the "
        "device (the store keeps the fine grid for the tumour stage).",
    )
    crop_size: tuple[int, int] = Field(
        (96, 96), description="Tumour stage: (Y, X) training crop inside the liver ROI."
    )
    roi_margin_mm: float = Field(
        10.0, ge=0, description="Tumour stage: margin around the liver's bounding box (mm)."
    )
    roi_jitter_mm: float = Field(
        10.0,
        ge=0,
        description="Tumour stage: random shift of the training ROI's edges (mm), so that "
        "training crops look like the ROIs an imperfect stage 1 gives.",
    )
    relative_window_hu: float = Field(
        75.0,
        gt=0,
        description="Tumour stage: input is (HU - liver median HU) / this, so tumours keep "
        "their contrast to the liver whatever its enhancement.",
    )
    relative_clip: bool = Field(
        True,
        description="Tumour stage: clip that input to [-1, 1], a window of +/- "
        "relative_window_hu around the liver's median (a narrow liver window): the "
        "network's input range goes to the HU where lesions differ from liver; air, fat "
        "and bone saturate. Runs trained before this setting existed read unclipped.",
    )
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["cosine", "poly"] = "cosine"
    grad_clip: float = Field(1.0, ge=0, description="Max gradient norm; 0 turns clipping off.")
    oversample: tuple[float, float] = Field(
        (1 / 3, 1 / 3), description="Batch fractions drawn from tumour slices and liver slices."
    )
    val_every: int = Field(200, ge=1, description="Validate every N steps (and at the end).")
    log_every: int = Field(10, ge=1)
    seed: int = 0
    resident: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Keep the train split in device memory (auto: when it fits "
        "resident_budget_gb), or stream it from the store.",
    )
    resident_budget_gb: float = Field(8.0, gt=0)
    stream_threads: int = Field(4, ge=1, description="Reader threads in streaming mode.")
    prefetch: int = Field(4, ge=1, description="Batches read ahead in streaming mode.")
    stream_cache_gb: float = Field(
        2.0,
        ge=0,
        description="Streaming mode: decoded store chunks kept in RAM by the training "
        "process (least recently used go first); 0 reads every sample from the store.",
    )
    compile: bool = Field(False, description="torch.compile the model (CUDA).")
    augment: AugmentConfig = AugmentConfig()

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.context_slices % 2 == 0:
            raise ValueError("context_slices must be odd")
        if min(self.crop_size) < STRIDE or any(c % STRIDE for c in self.crop_size):
            raise ValueError(f"crop_size must be multiples of {STRIDE} (the encoders' stride)")
        if sum(self.oversample) > 1:
            raise ValueError("oversample fractions must sum to at most 1")
        return self


class TumourConfig(TrainConfig):
    """Training of the tumour stage (``[tumour]``): the same fields as ``[train]``, with
    the defaults of stage 2 (tumour slices oversampled; no whole-slice downsampling)."""

    stage: Stage = Field("tumour", description="Always tumour in this section.")
    oversample: tuple[float, float] = Field(
        (0.5, 0.0), description="Batch fractions drawn from tumour slices and liver slices."
    )
    augment: TumourAugmentConfig = TumourAugmentConfig()


class TrainAllConfig(_Frozen):
    """How ``train-all`` schedules its six jobs (``liverpipe train-all``, the flow)."""

    minutes: float | None = Field(
        None,
        gt=0,
        description="Wall-clock budget of the training: each job, when it starts, gets "
        "its share of the minutes left as its max_minutes (the lanes' time less what "
        "running jobs still plan to use, in the part its cost is of the jobs not yet "
        "started), so what a fast job leaves goes to those after it. Validation runs "
        "outside it. None: no budget.",
    )


class IngestConfig(_Frozen):
    """The scheduled ``ingest`` flow and the served deployments (``liverpipe serve``)."""

    cron: str = Field("*/10 * * * *", description="Schedule of the ingest deployment (cron).")
    min_new_cases: int = Field(
        5, ge=1, description="New labelled cases since the last training that trigger train-all."
    )
    tta: bool = Field(False, description="Flip TTA when ingest predicts unlabelled scans.")
    verify_every: int = Field(
        0,
        ge=0,
        description="Every N ticks, re-hash every inbox file instead of trusting unchanged "
        "file identities (size, mtime, inode, ctime); 0: never.",
    )
    trust_ctime: bool = Field(
        True,
        description="Count a file's ctime in its identity (git's core.trustctime): an in-place "
        "rewrite that keeps size and mtime is then still noticed. Turn off where ctime changes "
        "without a content change (some network shares); such a rewrite is then found only "
        "by --verify or verify_every.",
    )
    repredict_on_promotion: bool = Field(
        False,
        description="After a new champion is promoted, predict the already-predicted "
        "unlabelled scans again with it (the ledger keeps every version).",
    )
    dicomweb_url: str | None = Field(
        None,
        description="A DICOMweb PACS to poll as an inbox (its root, e.g. Orthanc's "
        "http://127.0.0.1:8042/dicom-web): each tick predicts its new CT series and stores "
        "each DICOM-SEG back into its study (STOW-RS). None: no PACS.",
    )
    dicomweb_lookback_days: int = Field(
        0,
        ge=0,
        description="Query only the PACS studies of the last N days (StudyDate); 0: every "
        "CT series. Set it on a large archive, above the delay a study may take to arrive.",
    )
    dicomweb_timeout_s: float = Field(
        60.0, gt=0, description="Timeout of each DICOMweb request (seconds)."
    )


class RegistryConfig(_Frozen):
    """The promotion rule of the model registry (``liverpipe models``, train-all)."""

    liver_dice_tolerance: float = Field(
        0.005,
        ge=0,
        description="A challenger may score at most this much below the champion's mean "
        "liver Dice on the frozen test cases.",
    )
    tumour_dice_tolerance: float = Field(
        0.01,
        ge=0,
        description="A challenger may score at most this much below the champion's tumour "
        "global Dice on the frozen test cases.",
    )


class EvaluateConfig(_Frozen):
    """How ``evaluate`` scores cases (``liverpipe evaluate``, the train-all report)."""

    empty_rule: Literal["lits", "exclude"] = Field(
        "lits",
        description="Per-case Dice and Jaccard of a class absent from the ground truth: "
        "lits scores 1 when nothing is predicted and 0 otherwise (the LiTS convention); "
        "exclude leaves the case out of the class's means (undefined).",
    )
    max_train_cases: int = Field(
        0,
        ge=0,
        description="Score at most this many train cases (the first by case id; 0: all). "
        "Scoring on native grids costs seconds per case; the report says how many were used.",
    )
    workers: int = Field(
        0,
        ge=0,
        description="Cases scored at a time, in threads (0: one per core, at most 4). Each "
        "holds a scan with its softmax and labels in memory.",
    )


class Settings(_Frozen):
    """All configuration sections. Each section is its own frozen model."""

    check: CheckConfig = CheckConfig()
    synth: SynthConfig = SynthConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    store: StoreConfig = StoreConfig()
    train: TrainConfig = TrainConfig()
    tumour: TumourConfig = TumourConfig()
    train_all: TrainAllConfig = TrainAllConfig()
    ingest: IngestConfig = IngestConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegistryConfig = RegistryConfig()

    @model_validator(mode="after")
    def _stages(self) -> Settings:
        if self.train.stage != "liver" or self.tumour.stage != "tumour":
            raise ValueError("[train] is the liver stage and [tumour] the tumour stage")
        return self

    def stage(self, stage: Stage) -> TrainConfig:
        """The training config of one stage: ``[train]`` (liver) or ``[tumour]``."""
        return self.train if stage == "liver" else self.tumour


def _problem(error: Any) -> str:
    """One validation error as ``section.key: message, got value``."""
    where = ".".join(str(p) for p in error["loc"])
    value = error.get("input")
    got = "" if isinstance(value, dict | list) else f", got {value!r}"
    return f"{where}: {error['msg']}{got}"


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as err:
        raise ConfigError(
            path, "the config file does not exist", "pass an existing TOML file to --config"
        ) from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(
            path, f"the file is not valid TOML ({err})", "correct the TOML syntax"
        ) from err


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """``LIVERPIPE_CHECK__MAX_DIM=512`` becomes ``{"check": {"max_dim": 512}}``; deeper
    keys nest: ``LIVERPIPE_TRAIN__AUGMENT__ELASTIC=true``."""
    out: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        *path, field = key[len(ENV_PREFIX) :].lower().split("__")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[field] = _parse_env_value(value)
    return out


def _parse_env_value(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def load_settings(
    config: Path | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings from a TOML file, ``LIVERPIPE_*`` variables and CLI overrides.

    ``overrides`` maps section -> field -> value; ``None`` values are ignored so that
    unset CLI flags do not mask the file.
    """
    data: dict[str, Any] = _read_toml(config) if config is not None else {}
    data = _merge(data, _env_overrides(os.environ if environ is None else environ))
    cli = {s: {k: v for k, v in f.items() if v is not None} for s, f in (overrides or {}).items()}
    data = _merge(data, cli)
    try:
        return Settings.model_validate(data)
    except ValidationError as err:
        where = config if config is not None else "configuration"
        problems = "; ".join(_problem(e) for e in err.errors())
        raise ConfigError(
            where,
            f"invalid settings ({problems})",
            "correct or remove these keys; `liverpipe config` lists every valid key",
        ) from err
