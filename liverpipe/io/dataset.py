"""Discovery of cases in an MSD / Kaggle ``imagesTr/``, ``labelsTr/`` folder.

Rules (``docs/data.md``):
- images pair with labels by case id, the file name without ``.nii``/``.nii.gz``;
  nnU-Net's ``_0000`` channel suffix on an image name is also understood;
- ``dataset.json`` is optional; when present its ``training`` and ``test`` entries are
  used, and every path must stay inside the data folder;
- hidden files, macOS ``._*`` files and non-NIfTI files are ignored;
- a training image without its label is an error for that case, not for the dataset.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from liverpipe.errors import DatasetLayoutError
from liverpipe.io.nifti import case_id_of, is_nifti, not_a_file

__all__ = ["CaseFiles", "DatasetIndex", "discover", "discover_scans"]

Role = Literal["train", "test"]
_NNUNET_CHANNEL = "_0000"


@dataclass(frozen=True)
class CaseFiles:
    """One case's files. ``label`` is None for unlabelled (``imagesTs``) scans."""

    case_id: str
    image: Path | None
    label: Path | None
    role: Role = "train"
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class DatasetIndex:
    """Every case found under ``root``, sorted by case id within each role."""

    root: Path
    cases: tuple[CaseFiles, ...]
    from_dataset_json: bool
    ignored: tuple[Path, ...] = field(default=())

    @property
    def training(self) -> tuple[CaseFiles, ...]:
        return tuple(c for c in self.cases if c.role == "train")


def discover(root: Path) -> DatasetIndex:
    """Index the cases of a data folder.

    Raises:
        DatasetLayoutError: ``root`` is missing, has no ``imagesTr/``, or its
            ``dataset.json`` cannot be parsed.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(
            root, "the data folder does not exist", "pass the folder that holds imagesTr/"
        )
    spec = root / "dataset.json"
    if spec.is_file():
        return _from_dataset_json(root, spec)
    if not (root / "imagesTr").is_dir():
        raise DatasetLayoutError(
            root,
            "there is no imagesTr/ folder and no dataset.json",
            "point at the dataset root (the folder that contains imagesTr/ and labelsTr/)",
        )
    return _from_folders(root)


#: Side files a folder of scans often holds; ``discover_scans`` does not treat them as scans.
_SIDE_SUFFIXES = (".json", ".md", ".txt", ".csv", ".tsv", ".yaml", ".yml", ".log", ".html")


def discover_scans(path: Path) -> DatasetIndex:
    """Cases to *check*: a dataset root (as :func:`discover`), a single file, or a flat
    folder whose every visible file (side files such as ``.json`` aside) is one
    unlabelled scan, whatever its name claims, so that each gets a diagnosis.

    Raises:
        DatasetLayoutError: ``path`` does not exist.
    """
    path = Path(path)
    if path.is_file():
        return DatasetIndex(path.parent, (CaseFiles(case_id_of(path), path, None, "test"),), False)
    if not path.is_dir():
        raise DatasetLayoutError(
            path, "no such file or folder", "pass a dataset root, a folder of scans or a scan"
        )
    if (path / "imagesTr").is_dir() or (path / "dataset.json").is_file():
        return discover(path)
    visible = [
        p
        for p in sorted(path.iterdir())
        if not p.name.startswith(".") and not p.name.endswith(_SIDE_SUFFIXES)
    ]
    cases = tuple(
        CaseFiles(case_id_of(p), p, None, "test")
        if p.is_file()
        else CaseFiles(case_id_of(p), None, None, "test", (str(not_a_file(p)),))
        for p in visible
        if p.is_file() or is_nifti(p)  # a folder named like a scan is diagnosed, not skipped
    )
    return DatasetIndex(path, cases, False)


def _nifti_files(folder: Path) -> tuple[dict[str, list[Path]], list[Path], set[Path]]:
    """NIfTI-named entries of ``folder`` by case id, the entries ignored, and the
    NIfTI-named entries that are not files (a broken link, a folder): those stay in
    their case, whose pairing then names what is wrong with them."""
    found: dict[str, list[Path]] = {}
    ignored: list[Path] = []
    odd: set[Path] = set()
    if not folder.is_dir():
        return found, ignored, odd
    # scandir's entries know their type without a stat per file (an inbox may hold 10,000).
    with os.scandir(folder) as it:
        listing = sorted((e.name, e.is_file()) for e in it)
    for name, is_file in listing:
        path = folder / name
        if not is_nifti(path):
            ignored.append(path)
            continue
        found.setdefault(case_id_of(path), []).append(path)
        if not is_file:
            odd.add(path)
    return found, ignored, odd


def _strip_channel(
    images: dict[str, list[Path]], labels: dict[str, list[Path]]
) -> dict[str, list[Path]]:
    """Map nnU-Net style ``case_0000`` images onto ``case`` when that pairs them."""
    out: dict[str, list[Path]] = {}
    for cid, paths in images.items():
        base = cid[: -len(_NNUNET_CHANNEL)] if cid.endswith(_NNUNET_CHANNEL) else cid
        key = base if cid not in labels and base in labels else cid
        out.setdefault(key, []).extend(paths)
    return out


def _from_folders(root: Path) -> DatasetIndex:
    labels, ignored_l, odd_l = _nifti_files(root / "labelsTr")
    images, ignored_i, odd_i = _nifti_files(root / "imagesTr")
    images = _strip_channel(images, labels)
    tests, ignored_t, odd_t = _nifti_files(root / "imagesTs")
    odd = odd_l | odd_i | odd_t
    cases = [
        _pair(cid, images.get(cid, []), labels.get(cid, []), odd) for cid in sorted(images | labels)
    ]
    cases += [_single_test(cid, paths, odd) for cid, paths in sorted(tests.items())]
    return DatasetIndex(root, tuple(cases), False, tuple(ignored_i + ignored_l + ignored_t))


def _pair(case_id: str, images: list[Path], labels: list[Path], odd: set[Path]) -> CaseFiles:
    unreadable = tuple(str(not_a_file(p)) for p in (*images, *labels) if p in odd)
    if unreadable:  # the case's readable file, if any, is still checked on its own
        image = next((p for p in images if p not in odd), None)
        label = next((p for p in labels if p not in odd), None)
        return CaseFiles(case_id, image, label, "train", unreadable)
    problems = []
    for kind, paths in (("image", images), ("label", labels)):
        if len(paths) > 1:
            problems.append(
                f"{', '.join(str(p) for p in paths)}: case '{case_id}' has {len(paths)} {kind} files. "
                "Fix: keep exactly one (.nii or .nii.gz) and move the other out of the folder."
            )
    image = images[0] if images else None
    label = labels[0] if labels else None
    if image is None and label is not None:
        problems.append(
            f"{label}: label without an image (no imagesTr/{case_id}.nii[.gz]). "
            "Fix: add the image or remove the stray label."
        )
    if label is None and image is not None:
        problems.append(
            f"{image}: training image without a label (no labelsTr/{case_id}.nii[.gz]). "
            "Fix: add the label, or move the scan to imagesTs/ if it is unlabelled."
        )
    return CaseFiles(case_id, image, label, "train", tuple(problems))


def _single_test(case_id: str, paths: list[Path], odd: set[Path]) -> CaseFiles:
    problems = tuple(str(not_a_file(p)) for p in paths if p in odd)
    if len(paths) > 1:
        problems += (
            f"{paths[0]}: case '{case_id}' has {len(paths)} files in imagesTs/. Fix: keep exactly one.",
        )
    return CaseFiles(
        case_id, next((p for p in paths if p not in odd), None), None, "test", problems
    )


def _from_dataset_json(root: Path, spec: Path) -> DatasetIndex:
    try:
        meta: Any = json.loads(spec.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetLayoutError(
            spec, f"dataset.json is not valid JSON ({err})", "repair or delete it"
        ) from err
    if not isinstance(meta, dict) or not isinstance(meta.get("training", []), list):
        raise DatasetLayoutError(
            spec, "dataset.json has no 'training' list", "use the MSD layout or delete dataset.json"
        )
    cases = [_json_training_entry(root, spec, i, e) for i, e in enumerate(meta.get("training", []))]
    cases += [_json_test_entry(root, spec, e) for e in meta.get("test", [])]
    _flag_duplicates(cases)
    return DatasetIndex(root, tuple(cases), True)


def _json_training_entry(root: Path, spec: Path, index: int, entry: Any) -> CaseFiles:
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
        return CaseFiles(
            f"training[{index}]",
            None,
            None,
            "train",
            (
                f"{spec}: training entry {index} is not {{'image': ..., 'label': ...}}. Fix: repair that entry.",
            ),
        )
    image, p1 = _resolve(root, spec, entry["image"])
    label_ref = entry.get("label")
    label, p2 = _resolve(root, spec, label_ref) if isinstance(label_ref, str) else (None, [])
    problems = p1 + p2
    if not isinstance(label_ref, str):
        problems.append(
            f"{spec}: training entry '{entry['image']}' has no label. Fix: add its label path."
        )
    return CaseFiles(case_id_of(Path(entry["image"])), image, label, "train", tuple(problems))


def _json_test_entry(root: Path, spec: Path, entry: Any) -> CaseFiles:
    ref = entry.get("image") if isinstance(entry, dict) else entry
    if not isinstance(ref, str):
        return CaseFiles(
            "test[?]", None, None, "test", (f"{spec}: a test entry is not a path. Fix: repair it.",)
        )
    image, problems = _resolve(root, spec, ref)
    return CaseFiles(case_id_of(Path(ref)), image, None, "test", tuple(problems))


def _resolve(root: Path, spec: Path, ref: str) -> tuple[Path | None, list[str]]:
    path = (root / ref).resolve()
    if not path.is_relative_to(root.resolve()):
        return None, [
            f"{spec}: path '{ref}' points outside the data folder {root}. "
            "Fix: keep every dataset.json path inside the data folder."
        ]
    if (root / ref).is_dir() or ((root / ref).is_symlink() and not path.exists()):
        return None, [f"{not_a_file(root / ref)} (listed in dataset.json)"]
    if not path.is_file():
        return None, [
            f"{path}: listed in dataset.json but missing. Fix: add the file or remove the entry."
        ]
    return root / ref, []


def _flag_duplicates(cases: list[CaseFiles]) -> None:
    seen: dict[str, int] = {}
    for i, case in enumerate(cases):
        if case.case_id in seen:
            cases[i] = CaseFiles(
                case.case_id,
                case.image,
                case.label,
                case.role,
                (
                    *case.problems,
                    f"dataset.json lists case '{case.case_id}' twice. Fix: remove one entry.",
                ),
            )
        seen[case.case_id] = i
