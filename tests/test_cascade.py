"""The two-stage cascade: ROI logic with oracle stages, no-liver scans, learning tumours."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO, write_nifti

from liverpipe.infer import (
    PostProcess,
    Predictor,
    StageModels,
    keep_largest_liver,
    keep_seeded_lesions,
    liver_stage,
    native_labels,
    predict_file,
    prepare_scan,
    tumour_stage,
)
from liverpipe.labels import Label
from liverpipe.models import load_cascade
from liverpipe.roi import Box, crop, fit_to_multiple, grow, liver_box, margin_voxels
from liverpipe.settings import TUMOUR_SEED, TUMOUR_THRESHOLD, PreprocessConfig
from liverpipe.train import pick_threshold

#: HU of each label in the oracle scans: the image encodes its own label.
HU = {Label.BACKGROUND: -100.0, Label.LIVER: 60.0, Label.TUMOUR: 20.0}


class Oracle(torch.nn.Module):
    """A "model" that reads the label back from the centre slice's intensity.

    Its logits are minus the squared distance of the value to each label's value (in the
    units the stage reads), so the argmax is the label the scan was made from.
    """

    def __init__(self, centres: list[float]) -> None:
        super().__init__()
        self.register_buffer("centres", torch.tensor(centres).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x[:, x.shape[1] // 2 : x.shape[1] // 2 + 1]
        return -((centre - self.centres) ** 2) * 100.0


def _scan(tmp_path: Path, codes: str, rotate: float) -> tuple[Path, Path]:
    """A body with a liver and two tumours, one on the liver box's edge, in ``codes``."""
    from test_predict import _reencode

    label = np.zeros((60, 50, 24), np.uint8)  # RAS (x, y, z)
    label[5:55, 5:45, 2:22] = 0  # body background
    label[15:45, 12:38, 4:20] = Label.LIVER
    label[15:21, 20:26, 8:12] = Label.TUMOUR  # on the liver box's low-x face
    label[30:36, 25:31, 14:18] = Label.TUMOUR
    image = np.vectorize(HU.get)(label).astype(np.int16)
    affine = np.diag([1.5, 1.5, 2.5, 1.0])
    write_nifti(tmp_path / "ras.nii.gz", image, affine)
    write_nifti(tmp_path / "ras_label.nii.gz", label, affine)
    scan = _reencode(tmp_path / "ras.nii.gz", tmp_path / "scan.nii.gz", codes, rotate=rotate)
    truth = _reencode(
        tmp_path / "ras_label.nii.gz", tmp_path / "label.nii.gz", codes, rotate=rotate
    )
    return scan, truth


def _oracle_stages(config: PreprocessConfig) -> tuple[StageModels, StageModels]:
    low, high = config.hu_window
    window = [(min(max(HU[k], low), high) - low) / (high - low) for k in Label]
    liver = StageModels([Oracle(window)], 3)
    gain = (high - low) / 150.0
    relative = [(v - window[Label.LIVER]) * gain for v in window]
    return liver, StageModels([Oracle(relative)], 3, margin_mm=0.0, gain=gain)


@pytest.mark.parametrize(
    ("codes", "rotate"), [("LPS", 0.0), ("PIR", 0.0), ("IRA", 0.0), ("RAS", 0.35)]
)
def test_the_cascade_of_oracles_reproduces_the_label(
    tmp_path: Path, codes: str, rotate: float
) -> None:
    """ROI, margins, crops and pasting back are exact: oracle stages give the label back
    on the native grid, a tumour on the ROI's border included."""
    scan_path, label_path = _scan(tmp_path, codes, rotate)
    truth = np.asarray(nib.load(label_path).dataobj)
    spacing = tuple(float(s) for s in np.linalg.norm(nib.load(scan_path).affine[:3, :3], axis=0))
    # The scan's own spacing (in canonical x, y, z order): every stored voxel is a voxel.
    canonical = sorted(
        range(3), key=lambda a: int(np.argmax(np.abs(nib.load(scan_path).affine[:3, a])))
    )
    target = tuple(spacing[a] for a in canonical)
    config = PreprocessConfig(target_spacing=target, slice_size=(96, 96))
    prepared = prepare_scan(scan_path, config)
    liver, tumour = _oracle_stages(config)
    probs = liver_stage(prepared.image, liver, torch.device("cpu"))
    result = tumour_stage(probs, prepared.image, prepared.grid.spacing, tumour, torch.device("cpu"))
    assert result.roi is not None and result.warnings == []
    labels = result.final.argmax(0).astype(np.uint8)
    roi_box = liver_box(labels >= Label.LIVER)
    assert roi_box is not None and roi_box == result.roi  # margin 0: the ROI is the liver box
    back = native_labels(labels, prepared, largest_liver=False, tumour_in_liver=False)
    assert np.array_equal(back, truth)
    assert (back == Label.TUMOUR).sum() == (truth == Label.TUMOUR).sum() > 0


def test_a_scan_without_liver_gives_an_empty_mask_and_a_warning(
    tiny_runs: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    cascade = load_cascade(tiny_runs / "manet")
    blind = replace(cascade, liver=replace(cascade.liver, model=Oracle([0.0, 10.0, 10.0])))
    scan = sorted((phantom_dir / "imagesTr").iterdir())[0]
    record = predict_file(Predictor([blind]), scan, tmp_path / "mask.nii.gz")
    mask = np.asarray(nib.load(tmp_path / "mask.nii.gz").dataobj)
    assert not mask.any() and record["liver_volume_ml"] == 0
    assert any("stage 1 found no liver" in w for w in record["warnings"])
    assert json.loads((tmp_path / "mask.json").read_text())["warnings"] == record["warnings"]


class Recorder(torch.nn.Module):
    """A "model" that keeps every input it is given and has no opinion (zero logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return torch.zeros(x.shape[0], 3, *x.shape[2:])


@pytest.mark.parametrize("clip", [False, True])
def test_the_tumour_stage_reads_the_liver_relative_window(clip: bool) -> None:
    """Stage 2 reads (value - liver median) * gain; with clip, within [-1, 1]: a bone far
    above the window saturates at 1, the liver reads 0 and a tumour keeps its contrast."""
    image = np.full((8, 64, 64), 0.1, np.float32)  # normalised units, background
    label = np.zeros(image.shape, np.uint8)
    label[2:6, 16:48, 16:48] = Label.LIVER
    image[label == Label.LIVER] = 0.5
    image[3:5, 30:34, 30:34], label[3:5, 30:34, 30:34] = 0.45, Label.TUMOUR
    image[3:5, 20:24, 40:44] = 3.0  # bone-bright, inside the liver's box
    liver_probs = np.eye(3, dtype=np.float32)[np.minimum(label, 1)].transpose(3, 0, 1, 2)
    recorder = Recorder()
    stage = StageModels([recorder], 3, margin_mm=0.0, gain=4.0, clip=clip)
    tumour_stage(liver_probs, image, (1.0, 1.0, 1.0), stage, torch.device("cpu"))
    seen = torch.cat(recorder.seen)
    assert float(seen.max()) == pytest.approx(1.0 if clip else 10.0)
    assert float(seen.min()) >= -1.6 - 1e-6  # background: (0.1 - 0.5) * 4
    assert bool(torch.isclose(seen, torch.tensor(-0.2)).any())  # tumour: (0.45 - 0.5) * 4
    assert (seen == 0).any()  # the liver's median is 0


def test_lesions_are_kept_whole_from_a_confident_core_and_faint_blobs_dropped() -> None:
    """Hysteresis: a lesion whose core reaches the seed keeps its whole extent down to the
    tumour threshold; a blob that never reaches it becomes liver; liver is untouched."""
    labels = np.ones((12, 40, 40), dtype=np.uint8)
    labels[:, :, 35:] = 0  # background
    probs = np.zeros(labels.shape, dtype=np.float32)
    labels[3:9, 5:15, 5:15] = Label.TUMOUR  # a lesion: border 0.6, core 0.99
    probs[3:9, 5:15, 5:15] = 0.6
    probs[5:7, 9:11, 9:11] = 0.99
    labels[4:7, 25:30, 20:25] = Label.TUMOUR  # a faint blob: 0.9 at most
    probs[4:7, 25:30, 20:25] = 0.9
    labels[10, 30, 30] = Label.TUMOUR  # one confident voxel on its own
    probs[10, 30, 30] = 0.985
    out = keep_seeded_lesions(labels, probs, 0.98)
    assert (out[3:9, 5:15, 5:15] == Label.TUMOUR).all()
    assert (out[4:7, 25:30, 20:25] == Label.LIVER).all()
    assert out[10, 30, 30] == Label.TUMOUR
    assert ((out > 0) == (labels > 0)).all()  # only tumour turns into liver
    assert np.array_equal(keep_seeded_lesions(labels, probs, 0.5), labels)  # under the
    # tumour threshold every lesion is seeded
    assert np.array_equal(keep_seeded_lesions(out, probs, 0.98), out)


def test_the_lesion_seed_only_turns_tumour_into_liver(tiny_runs: Path, phantom_dir: Path) -> None:
    """Predictor's default seed against none, on a real prediction of the tiny runs."""
    scan = sorted((phantom_dir / "imagesTr").iterdir())[0]
    cascade = load_cascade(tiny_runs / "manet")
    seeded, _ = Predictor([cascade]).labels(scan)
    plain, _ = Predictor([cascade], post=PostProcess(tumour_seed=0)).labels(scan)
    assert PostProcess().tumour_seed == TUMOUR_SEED > 0.9
    assert ((seeded > 0) == (plain > 0)).all()
    assert not ((seeded == Label.TUMOUR) & (plain != Label.TUMOUR)).any()


def test_the_threshold_is_tuned_for_the_rule_prediction_applies() -> None:
    """Tuning decides each candidate with the lesion seed, as prediction does: a faint
    false blob that only a high threshold removes without the seed (so the tuning picked
    0.9 and cut the true lesion to its inner part) goes to the seed, and the tuning picks
    the threshold that keeps the lesion whole."""
    shape = (8, 40, 40)
    truth = np.ones(shape, np.uint8)
    truth[2:6, 5:15, 5:15] = Label.TUMOUR  # a 400-voxel lesion
    p2 = np.zeros(shape, np.float32)
    p2[2:6, 5:15, 5:15] = 0.7  # its rim
    p2[2:6, 7:13, 7:13] = 0.95  # its inner part
    p2[3:5, 9:11, 9:11] = 0.995  # its confident core
    p2[1, 4:16, 4:16][p2[1, 4:16, 4:16] == 0] = 0.55  # a halo above it, liver in truth
    p2[1:7, 20:35, 20:35] = 0.85  # a faint false blob of 1,350 voxels
    probs = np.stack([np.zeros(shape, np.float32), 1 - p2, p2])
    faint = np.where(p2 == 0.85, p2, 0)  # a tumour-free case with the same false blob
    tumour_free = (np.stack([np.zeros(shape, np.float32), 1 - faint, faint]), truth.clip(0, 1))
    plain, _ = pick_threshold([(probs, truth), tumour_free], seed=0.0)
    seeded, scores = pick_threshold([(probs, truth), tumour_free], seed=0.99)
    assert plain == 0.9
    assert seeded == 0.6 and scores["0.6"] == pytest.approx(1.0)
    assert scores["0.5"] < 1.0  # the halo joins the lesion under 0.6
    assert pick_threshold([tumour_free], seed=0.99)[0] is None  # nothing to tune on


def test_prediction_thresholds_at_the_fixed_value_unless_asked_for_the_tuned_one(
    tiny_runs: Path, phantom_dir: Path
) -> None:
    """The default tumour threshold is settings.TUMOUR_THRESHOLD whatever the run tuned;
    None asks for the run's own; the threshold reaches the labels; the run records the
    seed its threshold was tuned with."""
    cascade = load_cascade(tiny_runs / "manet")
    assert cascade.tumour is not None
    assert Predictor([cascade]).tumour_threshold == TUMOUR_THRESHOLD == 0.5
    tuned = Predictor([cascade], post=PostProcess(tumour_threshold=None))
    assert tuned.tumour_threshold == cascade.tumour.tumour_threshold
    result = json.loads((tiny_runs / "manet" / "tumour" / "result.json").read_text())
    assert result["threshold_seed"] == (TUMOUR_SEED if result["thresholds_tried"] else None)
    path = sorted((phantom_dir / "imagesTr").iterdir())[0]
    scan = prepare_scan(path, cascade.liver.preprocess, cascade.liver.zscore)
    z, y, x = scan.image.shape
    p2 = np.zeros(scan.image.shape, np.float32)
    p2[z // 3 : 2 * z // 3, y // 3 : y // 2, x // 3 : x // 2] = 0.7  # a lesion at 0.7
    liver = np.zeros_like(p2)
    liver[z // 4 : 3 * z // 4, y // 4 : 3 * y // 4, x // 4 : 3 * x // 4] = (
        1 - p2[z // 4 : 3 * z // 4, y // 4 : 3 * y // 4, x // 4 : 3 * x // 4]
    )
    probs = np.stack([1 - liver - p2, liver, p2])
    labels = {
        t: Predictor([cascade], post=PostProcess(tumour_seed=0, tumour_threshold=t)).native(
            probs, scan
        )
        for t in (0.5, 0.9)
    }
    assert (labels[0.5] == Label.TUMOUR).any() and not (labels[0.9] == Label.TUMOUR).any()
    assert ((labels[0.5] > 0) == (labels[0.9] > 0)).all()  # only tumour turned into liver
    stage1_only = replace(cascade, tumour=None)
    assert Predictor([stage1_only]).tumour_threshold is None  # stage 1 alone: argmax


def test_roi_boxes_grow_fit_and_crop() -> None:
    box = Box(2, 5, 10, 20, 30, 33)
    assert grow(box, (1, 2, 3)) == Box(1, 6, 8, 22, 27, 36)
    fitted = fit_to_multiple(Box(0, 1, 3, 10, 0, 32), 32)
    assert (
        fitted.shape[1] % 32 == 0 and fitted.shape[2] == 32 and fitted.y0 <= 3 and fitted.y1 >= 10
    )
    volume = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    out = crop(volume, Box(-1, 2, 3, 7, -2, 2), fill=-9.0)
    assert out.shape == (3, 4, 4)
    assert (out[0] == -9).all() and (out[:, 2:] == -9).all() and (out[:, :, :2] == -9).all()
    np.testing.assert_array_equal(out[1:, :2, 2:], volume[0:2, 3:5, 0:2])
    assert margin_voxels(10.0, (2.0, 2.5, 3.0)) == (4, 4, 5)


@pytest.mark.slow
def test_a_tiny_cascade_finds_tumours_that_stage_one_misses(tmp_path: Path) -> None:
    """Full-size phantoms: stage 2 (at the store's 2 mm) reaches a tumour Dice that stage
    1 (whole slices at 6 mm) does not, on the same phantoms."""
    from liverpipe.evaluate import overlap
    from liverpipe.io import read_header, read_voxels
    from liverpipe.preprocess import preprocess_dataset, serial_runner
    from liverpipe.settings import load_settings
    from liverpipe.synth.writer import generate_dataset
    from liverpipe.train import train

    pairs = generate_dataset(tmp_path / "data", 6, seed=11, size="full", workers=2)
    settings = load_settings(
        REPO / "configs" / "cpu.toml",
        {
            "preprocess": {"split_fractions": (1.0, 0.0, 0.0)},
            "train": {"model": "deeplabv3plus", "steps": 80, "val_every": 80},
            "tumour": {"model": "deeplabv3plus", "steps": 250, "val_every": 250},
        },
    )
    preprocess_dataset(tmp_path / "data", tmp_path / "store.zarr", settings, serial_runner)
    for stage in ("liver", "tumour"):
        train(tmp_path / "store.zarr", tmp_path / "runs" / "m" / stage, settings, stage=stage)  # type: ignore[arg-type]
    predictor = Predictor([load_cascade(tmp_path / "runs" / "m")])
    stage1, cascade = [], []
    for image, label in pairs:
        truth = np.asarray(read_voxels(read_header(label))).astype(np.uint8) == Label.TUMOUR
        if not truth.any():
            continue
        out = predictor.predict_stages(image)
        stage1.append(overlap(out.liver == Label.TUMOUR, truth)["dice"])
        cascade.append(overlap(out.cascade == Label.TUMOUR, truth)["dice"])
    assert len(cascade) >= 3
    assert np.mean(cascade) > np.mean(stage1) + 0.15, (cascade, stage1)


def test_prediction_reads_stage_2_input_with_the_gain_training_used(
    tiny_runs: Path, tiny_store: Path
) -> None:
    """Training derives stage 2's gain from each stored case's intensity record,
    prediction from the run's saved preprocessing config: the two must agree, or stage 2
    reads a differently scaled input than it learnt on."""
    from liverpipe.roi import relative_gain
    from storage import SliceStore

    store = SliceStore.open(tiny_store)
    for model in ("deeplabv3plus", "manet", "unetplusplus"):
        tumour = load_cascade(tiny_runs / model).tumour
        assert tumour is not None
        for case_id in store.cases():
            intensity = store.case(case_id).meta.intensity
            trained = relative_gain(intensity.hu_scale, tumour.train.relative_window_hu)
            assert tumour.gain == pytest.approx(trained, rel=1e-12)
    assert relative_gain(450.0, 150.0) == 3.0


def test_the_largest_liver_component_is_kept_with_its_tumour_and_nothing_else() -> None:
    """keep_largest_liver works inside the liver's box only (issue 11: evaluation on
    native grids); it must give what the whole-volume rule gives: the largest
    26-connected component of liver and tumour, its labels unchanged, zero elsewhere,
    and leave its input alone."""
    import cc3d

    labels = np.zeros((16, 40, 36), dtype=np.uint8)
    labels[3:12, 5:25, 4:20] = Label.LIVER
    labels[5:8, 10:14, 8:12] = Label.TUMOUR
    labels[12, 25, 20] = Label.TUMOUR  # touches the big component at a corner only
    labels[2:5, 30:36, 28:34] = Label.LIVER  # a second, smaller component
    labels[3, 32, 30] = Label.TUMOUR
    labels[14, 1, 1] = Label.LIVER  # a stray voxel
    before = labels.copy()

    got = keep_largest_liver(labels)

    np.testing.assert_array_equal(labels, before)
    largest = cc3d.largest_k(labels > 0, k=1, connectivity=26) > 0
    np.testing.assert_array_equal(got, np.where(largest, labels, 0).astype(np.uint8))
    assert got.dtype == np.uint8
    assert got[12, 25, 20] == Label.TUMOUR and got[3, 32, 30] == 0 and got[14, 1, 1] == 0
    empty = np.zeros((4, 5, 6), dtype=np.uint8)
    kept = keep_largest_liver(empty)
    assert kept is not empty and not kept.any()
