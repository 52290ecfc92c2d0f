"""Discovery of MSD / Kaggle layouts: pairing, ignored files, dataset.json, and per-case errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_nifti

from liverpipe.errors import DatasetLayoutError
from liverpipe.io import discover

VOL = np.zeros((4, 4, 4), dtype=np.int16)
LAB = np.zeros((4, 4, 4), dtype=np.uint8)


def _kaggle_like(root: Path, n: int = 3) -> Path:
    """Task03_Liver_rs: plain .nii files, no dataset.json."""
    for i in range(n):
        write_nifti(root / "imagesTr" / f"liver_{i}.nii", VOL)
        write_nifti(root / "labelsTr" / f"liver_{i}.nii", LAB)
    return root


def test_kaggle_layout_pairs_plain_nii_by_name(tmp_path: Path) -> None:
    index = discover(_kaggle_like(tmp_path))
    assert not index.from_dataset_json
    assert [c.case_id for c in index.cases] == ["liver_0", "liver_1", "liver_2"]
    assert all(c.label is not None and c.label.name == f"{c.case_id}.nii" for c in index.cases)
    assert all(not c.problems for c in index.cases)


def test_hidden_macos_and_non_nifti_files_are_ignored(tmp_path: Path) -> None:
    _kaggle_like(tmp_path, 1)
    (tmp_path / "imagesTr" / "._liver_0.nii").write_bytes(b"\0\5\26\7 appledouble")
    (tmp_path / "imagesTr" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "labelsTr" / "notes.txt").write_text("hello")
    (tmp_path / "imagesTr" / "liver_0.json").write_text("{}")
    index = discover(tmp_path)
    assert [c.case_id for c in index.cases] == ["liver_0"]
    assert {p.name for p in index.ignored} == {
        "._liver_0.nii",
        ".DS_Store",
        "notes.txt",
        "liver_0.json",
    }


def test_missing_label_is_an_error_for_that_case_only(tmp_path: Path) -> None:
    _kaggle_like(tmp_path, 2)
    (tmp_path / "labelsTr" / "liver_1.nii").unlink()
    write_nifti(tmp_path / "labelsTr" / "stray.nii.gz", LAB)
    cases = {c.case_id: c for c in discover(tmp_path).cases}
    assert not cases["liver_0"].problems
    (problem,) = cases["liver_1"].problems
    assert "liver_1.nii: training image without a label" in problem and "Fix:" in problem
    assert "label without an image" in cases["stray"].problems[0]


def test_two_files_for_one_case_is_an_error(tmp_path: Path) -> None:
    _kaggle_like(tmp_path, 1)
    write_nifti(tmp_path / "imagesTr" / "liver_0.nii.gz", VOL)
    (case,) = discover(tmp_path).cases
    assert "has 2 image files" in case.problems[0]


def test_msd_layout_uses_dataset_json_and_test_images(tmp_path: Path) -> None:
    for i in (0, 1):
        write_nifti(tmp_path / "imagesTr" / f"liver_{i}.nii.gz", VOL)
        write_nifti(tmp_path / "labelsTr" / f"liver_{i}.nii.gz", LAB)
    write_nifti(tmp_path / "imagesTr" / "liver_9.nii.gz", VOL)  # present but not listed
    write_nifti(tmp_path / "imagesTs" / "liver_5.nii.gz", VOL)
    meta = {
        "name": "Liver",
        "training": [
            {"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"}
            for i in (0, 1)
        ],
        "test": ["./imagesTs/liver_5.nii.gz"],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    index = discover(tmp_path)
    assert index.from_dataset_json
    assert [(c.case_id, c.role) for c in index.cases] == [
        ("liver_0", "train"),
        ("liver_1", "train"),
        ("liver_5", "test"),
    ]
    assert index.cases[2].label is None and not index.cases[2].problems


def test_dataset_json_paths_must_stay_inside_the_folder(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_nifti(tmp_path / "outside.nii.gz", VOL)
    write_nifti(root / "labelsTr" / "a.nii.gz", LAB)
    meta = {"training": [{"image": "../outside.nii.gz", "label": "./labelsTr/a.nii.gz"}]}
    (root / "dataset.json").write_text(json.dumps(meta))
    (case,) = discover(root).cases
    assert case.image is None
    assert "points outside the data folder" in case.problems[0]


def test_dataset_json_missing_file_and_broken_json(tmp_path: Path) -> None:
    meta = {"training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    (case,) = discover(tmp_path).cases
    assert len(case.problems) == 2 and all(
        "listed in dataset.json but missing" in p for p in case.problems
    )
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetLayoutError, match=r"dataset\.json is not valid JSON"):
        discover(tmp_path)


def test_nnunet_channel_suffix_pairs(tmp_path: Path) -> None:
    write_nifti(tmp_path / "imagesTr" / "liver_3_0000.nii.gz", VOL)
    write_nifti(tmp_path / "labelsTr" / "liver_3.nii.gz", LAB)
    (case,) = discover(tmp_path).cases
    assert case.case_id == "liver_3" and not case.problems


def test_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="no imagesTr/ folder"):
        discover(tmp_path)
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        discover(tmp_path / "nope")


def test_phantom_dataset_json_is_msd_style(phantom_dir: Path, tmp_path: Path) -> None:
    meta = json.loads((phantom_dir / "dataset.json").read_text())
    assert meta["modality"] == {"0": "CT"}
    assert meta["labels"] == {"0": "background", "1": "liver", "2": "tumour"}
    assert meta["numTraining"] == len(meta["training"]) == 4
    copy = shutil.copytree(phantom_dir, tmp_path / "copy")
    index = discover(copy)
    assert index.from_dataset_json and len(index.training) == 4


def test_a_broken_link_or_a_folder_named_like_a_scan_is_named_as_such(tmp_path: Path) -> None:
    """Not 'label without an image': the image is there but unreadable, and the error
    says why (a dangling symbolic link, a folder), for pairs and for imagesTs alike."""
    _kaggle_like(tmp_path, 3)
    (tmp_path / "imagesTr" / "liver_1.nii").unlink()
    (tmp_path / "imagesTr" / "liver_1.nii").symlink_to(tmp_path / "gone" / "liver_1.nii")
    (tmp_path / "labelsTr" / "liver_2.nii").unlink()
    (tmp_path / "labelsTr" / "liver_2.nii").mkdir()
    (tmp_path / "imagesTs").mkdir()
    (tmp_path / "imagesTs" / "new.nii.gz").mkdir()
    cases = {c.case_id: c for c in discover(tmp_path).cases}
    assert not cases["liver_0"].problems
    (link,) = cases["liver_1"].problems
    assert "imagesTr/liver_1.nii: the file is a symbolic link to" in link
    assert "which does not exist" in link and "Fix: point the link at the scan" in link
    assert cases["liver_1"].image is None and cases["liver_1"].label is not None
    (folder,) = cases["liver_2"].problems
    assert "labelsTr/liver_2.nii: this is a folder, not a file. Fix:" in folder
    assert cases["liver_2"].label is None and cases["liver_2"].image is not None
    (test,) = cases["new"].problems
    assert "imagesTs/new.nii.gz: this is a folder" in test and cases["new"].image is None
