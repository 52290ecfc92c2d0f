"""``liverpipe check``: exit codes, JSON output, and one clear error per kind of bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import ct_volume, write_nifti
from typer.testing import CliRunner

from liverpipe.cli import app

runner = CliRunner()


def test_valid_dataset_exits_zero(tiny_case: Path) -> None:
    result = runner.invoke(app, ["check", str(tiny_case), "--json"])
    assert result.exit_code == 0, result.output
    reports = json.loads(result.stdout)
    assert [(r["case_id"], r["ok"], r["errors"]) for r in reports] == [
        ("case_a", True, []),
        ("case_b", True, []),
    ]


def test_phantoms_pass_the_check(phantom_dir: Path) -> None:
    result = runner.invoke(
        app, ["check", str(phantom_dir), "--json", "--config", "configs/tiny.toml"]
    )
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 4


def _break(root: Path) -> None:
    """One bad case per kind of problem, next to a good one."""
    good = np.zeros((8, 9, 10), dtype=np.uint8)
    vol = ct_volume((8, 9, 10))
    write_nifti(root / "imagesTr" / "badlabel.nii.gz", vol)
    write_nifti(root / "labelsTr" / "badlabel.nii.gz", good + 5)
    write_nifti(root / "imagesTr" / "nolabel.nii.gz", vol)
    write_nifti(root / "imagesTr" / "shifted.nii.gz", vol)
    moved = np.diag([1.0, 1.0, 2.0, 1.0])
    moved[2, 3] = 4.0
    write_nifti(root / "labelsTr" / "shifted.nii.gz", good, moved)
    write_nifti(root / "imagesTr" / "nan.nii.gz", np.full((8, 9, 10), np.nan, np.float32))
    write_nifti(root / "labelsTr" / "nan.nii.gz", good)
    truncated = write_nifti(
        root / "imagesTr" / "cut.nii.gz", np.random.default_rng(0).normal(size=(30, 30, 30))
    )
    truncated.write_bytes(truncated.read_bytes()[:3000])
    write_nifti(root / "labelsTr" / "cut.nii.gz", np.zeros((30, 30, 30), np.uint8))


def test_each_bad_case_is_reported_with_file_problem_and_fix(tiny_case: Path) -> None:
    _break(tiny_case)
    result = runner.invoke(app, ["check", str(tiny_case), "--json"])
    assert result.exit_code == 1
    reports = {r["case_id"]: r for r in json.loads(result.stdout)}
    assert reports["case_a"]["ok"] and reports["case_b"]["ok"]
    expected = {
        "badlabel": "labelsTr/badlabel.nii.gz: label values must be 0 (background), 1 (liver) or 2 (tumour), found 5",
        "nolabel": "imagesTr/nolabel.nii.gz: training image without a label",
        "shifted": "labelsTr/shifted.nii.gz: label grid is 4 mm away from the image grid",
        "nan": "imagesTr/nan.nii.gz: 720 voxels are NaN or infinite",
        "cut": "imagesTr/cut.nii.gz: the gzip stream is truncated or corrupt",
    }
    for case_id, message in expected.items():
        (error,) = reports[case_id]["errors"]
        assert not reports[case_id]["ok"]
        assert message in error, error
        assert "Fix:" in error


def test_table_output_and_missing_folder(tiny_case: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["check", str(tiny_case)])
    assert result.exit_code == 0
    assert "2 of 2 cases valid" in result.stdout
    empty = tmp_path / "empty"
    (empty / "imagesTr").mkdir(parents=True)
    assert runner.invoke(app, ["check", str(empty)]).exit_code == 1  # no cases is not success


def test_raw_inputs_are_never_modified(tiny_case: Path, tmp_path: Path) -> None:
    _break(tiny_case)
    before = {p: p.read_bytes() for p in tiny_case.rglob("*") if p.is_file()}
    runner.invoke(app, ["check", str(tiny_case)])
    after = {p: p.read_bytes() for p in tiny_case.rglob("*") if p.is_file()}
    assert before == after


def test_help_lists_commands_with_examples() -> None:
    result = runner.invoke(app, ["--help"])
    assert all(cmd in result.stdout for cmd in ("synth", "check", "config"))
    for cmd in ("synth", "check", "config"):
        assert "Example: liverpipe" in runner.invoke(app, [cmd, "--help"]).stdout
    # Section names in square brackets are text, not Rich markup that vanishes.
    assert "[check], [synth]" in runner.invoke(app, ["config", "--help"]).stdout
    assert "[tumour]" in runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).stdout


def test_bad_config_is_a_clear_error(tiny_case: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[check]\nmax_dim = -3\n")
    result = runner.invoke(app, ["check", str(tiny_case), "--config", str(bad)])
    assert result.exit_code != 0
    assert "check.max_dim" in str(result.exception)


def test_copy_of_dataset_is_independent(phantom_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(phantom_dir, tmp_path / "c"))
    next(iter((copy / "labelsTr").iterdir())).write_bytes(b"garbage")
    result = runner.invoke(app, ["check", str(copy), "--json"])
    assert result.exit_code == 1
    assert sum(not r["ok"] for r in json.loads(result.stdout)) == 1


def test_a_folder_of_unreadable_files_gets_one_json_row_each(tmp_path: Path) -> None:
    """scl_inter NaN, zero bytes, a PNG and a single slice: each named, no traceback."""
    import nibabel as nib

    folder = tmp_path / "scans"
    folder.mkdir()
    image = nib.Nifti1Image(np.zeros((20, 20, 20), np.int16), np.eye(4))
    image.header["scl_slope"], image.header["scl_inter"] = 1.0, float("nan")
    nib.save(image, folder / "nan_inter.nii.gz")
    (folder / "empty.nii.gz").write_bytes(b"")
    (folder / "picture.nii.gz").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(400))
    write_nifti(folder / "one_slice.nii.gz", np.full((40, 40, 1), 50, np.int16))
    write_nifti(folder / "fine.nii.gz", ct_volume((40, 40, 12), 50))
    (folder / "notes.txt").write_text("side files are not scans")
    result = runner.invoke(app, ["check", str(folder), "--json"])
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    rows = {r["case_id"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {"nan_inter", "empty", "picture", "one_slice", "fine"}
    expected = {
        "nan_inter": "invalid intercept nan",
        "empty": "empty (0 bytes)",
        "picture": "a PNG image",
        "one_slice": "1 axial slice(s)",
    }
    for case_id, problem in expected.items():
        (error,) = rows[case_id]["errors"]
        assert problem in error and "Fix:" in error and str(folder / case_id) in error
    assert rows["fine"]["ok"] and rows["fine"]["errors"] == []
    single = runner.invoke(app, ["check", str(folder / "picture.nii.gz"), "--json"])
    assert single.exit_code == 1 and "a PNG image" in single.stdout


def test_fixes_that_name_a_config_section_print_it_literally(tmp_path: Path) -> None:
    """rich reads '[check]' as markup and dropped it from the terminal output: the table
    and the preprocess summary must print a fix's config section as written."""
    write_nifti(tmp_path / "imagesTr" / "thin.nii.gz", np.zeros((8, 8, 2), np.int16))
    write_nifti(tmp_path / "labelsTr" / "thin.nii.gz", np.zeros((8, 8, 2), np.uint8))
    table = runner.invoke(app, ["check", str(tmp_path)], env={"COLUMNS": "400"})
    assert table.exit_code == 1
    assert "[check] min_slices sets the limit" in table.stdout
    summary = runner.invoke(
        app,
        ["preprocess", str(tmp_path), "--store", str(tmp_path / "s.zarr")],
        env={"COLUMNS": "400"},
    )
    assert "failed thin:" in summary.output
    assert "[check] min_slices sets the limit" in summary.output


def test_an_empty_label_and_a_blank_scan_are_flagged(tiny_case: Path) -> None:
    """A label with no liver and a scan with nothing above the body threshold are
    readable but almost surely wrong exports: check warns about both, naming the file."""
    shape = (8, 9, 10)
    write_nifti(tiny_case / "labelsTr" / "case_a.nii.gz", np.zeros(shape, np.uint8))
    write_nifti(tiny_case / "imagesTr" / "case_b.nii.gz", np.full(shape, -1024, np.int16))
    result = runner.invoke(app, ["check", str(tiny_case), "--json"])
    reports = {r["case_id"]: r for r in json.loads(result.stdout)}
    (empty,) = reports["case_a"]["warnings"]
    assert "labelsTr/case_a.nii.gz: the label marks no voxel as liver or tumour" in empty
    assert reports["case_a"]["fov"]["label_voxels"] == 0
    (blank,) = reports["case_b"]["warnings"]
    assert "imagesTr/case_b.nii.gz: no voxel is above -500 HU" in blank and "Fix:" in blank
    assert reports["case_b"]["fov"]["body_found"] is False
    assert reports["case_b"]["fov"]["label_voxels"] > 0


@pytest.mark.parametrize(
    "command",
    [
        ["synth", "{file}", "--cases", "1"],
        ["preprocess", "{data}", "--store", "{file}"],
        ["train", "--store", "{data}", "--out", "{file}/model"],
        ["train-all", "--store", "{data}", "--out", "{file}"],
        ["evaluate", "--store", "{data}", "--runs", "{data}", "--out", "{file}"],
    ],
    ids=["synth", "preprocess", "train", "train-all", "evaluate"],
)
def test_an_output_folder_that_is_a_file_is_refused_first(
    tiny_case: Path, tmp_path: Path, command: list[str]
) -> None:
    """An output option naming an existing file (or a path below one) raised
    NotADirectoryError or FileExistsError, some only after minutes of work; each command
    now refuses it first, naming the file."""
    from liverpipe.errors import LiverpipeError

    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    args = [a.format(file=blocker, data=tiny_case) for a in command]
    result = runner.invoke(app, args)
    assert isinstance(result.exception, LiverpipeError), result.output
    assert str(blocker) in str(result.exception) and "this is a file" in str(result.exception)
    assert blocker.read_text() == "a file"


def test_swapped_files_and_swapped_codes_get_their_diagnosis(tiny_case: Path) -> None:
    """Image and label swapped: each file is named for what it holds. A label whose liver
    and tumour codes are swapped is warned, by ``check`` and by preprocessing alike."""
    images, labels = tiny_case / "imagesTr", tiny_case / "labelsTr"
    scan = (images / "case_a.nii.gz").read_bytes()
    (images / "case_a.nii.gz").write_bytes((labels / "case_a.nii.gz").read_bytes())
    (labels / "case_a.nii.gz").write_bytes(scan)
    label = np.zeros((8, 9, 10), dtype=np.uint8)
    label[2:7, 2:7, 2:7] = 2  # "tumour" outside, "liver" inside: the codes swapped
    label[4, 4, 4] = 1
    write_nifti(labels / "case_b.nii.gz", label)
    result = runner.invoke(app, ["check", str(tiny_case), "--json"])
    assert result.exit_code == 1
    reports = {r["case_id"]: r for r in json.loads(result.stdout)}
    image_error, label_error = reports["case_a"]["errors"]
    assert "imagesTr/case_a.nii.gz: no voxel is below -50 HU (values 0 to 2)" in image_error
    assert "as in a label map" in image_error and "not swapped" in image_error
    assert "labelsTr/case_a.nii.gz" in label_error and "looks like a CT scan" in label_error
    assert reports["case_b"]["ok"] is True
    (warning,) = reports["case_b"]["warnings"]
    assert "labelsTr/case_b.nii.gz: the label has more tumour (2: 124 voxels)" in warning

    from liverpipe.preprocess import forward_case
    from liverpipe.settings import PreprocessConfig

    case = forward_case(
        images / "case_b.nii.gz", labels / "case_b.nii.gz", PreprocessConfig(slice_size=(16, 16))
    )
    assert any("codes look swapped" in w for w in case.warnings), case.warnings
