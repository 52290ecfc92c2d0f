"""The scheduled ingest's bookkeeping: tick state, the prediction ledger, the model choice.

An inbox has the dataset layout: ``imagesTr/`` + ``labelsTr/`` for labelled scans (the
store's manifest tracks them) and ``imagesTs/`` for unlabelled ones, NIfTI files or
folders of DICOM series (the ledger ``OUTPUTS/ledger.json`` tracks them). Both trust a file whose identity
(:mod:`liverpipe.io.identity`) is unchanged and hash only the others, so a tick that finds
nothing new reads no scan; ``verify`` (or every ``[ingest] verify_every`` ticks) hashes
them all.

Unlabelled scans are predicted by the registry's ensemble champion
(:mod:`liverpipe.ops.registry`); the ledger and each mask's measurements JSON name its
``run_id`` and models. With ``[ingest] repredict_on_promotion`` a scan predicted by an
older champion is predicted again; its previous mask moves to
``OUTPUTS/versions/<run_id>/`` and the ledger keeps both versions.

Nothing here imports torch until a scan is to be predicted: the no-op tick stays light.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Self

from liverpipe._files import read_json, write_json_atomic
from liverpipe.errors import LiverpipeError
from liverpipe.io import FileIdentity, case_id_of, file_sha256, folder_identity, is_nifti, unchanged
from liverpipe.ops.promotion import champion_models
from liverpipe.ops.registry import ENSEMBLE, Registry
from liverpipe.settings import IngestConfig
from storage import SliceStore, utc_now

__all__ = [
    "LEDGER",
    "STATE",
    "Ledger",
    "Pending",
    "TickState",
    "begin_tick",
    "champion",
    "champion_predictor",
    "inbox_cases",
    "predict_pending",
    "to_predict",
    "unlabelled_scans",
]

LEDGER = "ledger.json"  # in OUTPUTS
STATE = "ingest_state.json"  # in RUNS


@dataclass(frozen=True)
class TickState:
    """``RUNS/ingest_state.json``: ticks so far and the cases the last training saw."""

    ticks: int = 0
    trained_on: tuple[str, ...] = ()
    #: Whether this tick re-hashes every inbox file (``--verify`` or ``verify_every``).
    verify: bool = False

    @classmethod
    def load(cls, runs: Path) -> TickState:
        data = read_json(Path(runs) / STATE, {})
        return cls(int(data.get("ticks", 0)), tuple(data.get("trained_on", ())))

    def save(self, runs: Path) -> None:
        write_json_atomic(
            Path(runs) / STATE, {"ticks": self.ticks, "trained_on": sorted(self.trained_on)}
        )


def begin_tick(runs: Path, cfg: IngestConfig, verify: bool = False) -> TickState:
    """The state of the tick that starts now (saved by the caller when it ends)."""
    state = TickState.load(runs)
    number = state.ticks + 1
    due = cfg.verify_every > 0 and number % cfg.verify_every == 0
    return replace(state, ticks=number, verify=verify or due)


def inbox_cases(store: SliceStore, inbox: Path) -> set[str]:
    """Stored cases whose scan came from the inbox: cases preprocessed from elsewhere (a
    dataset run by hand, or ``make demo``) never trigger a retraining."""
    roots = {Path(inbox).absolute(), Path(inbox).resolve()}
    found = set()
    for case_id in store.cases():
        image = Path(store.manifest.entries[case_id].image)
        # Most paths are recorded under the inbox as given: no syscall for those.
        if any(image.is_absolute() and image.is_relative_to(r) for r in roots) or any(
            image.resolve().is_relative_to(r) for r in roots
        ):
            found.add(case_id)
    return found


def unlabelled_scans(inbox: Path) -> list[Path]:
    """The NIfTI files of ``INBOX/imagesTs`` and its sub-folders (each a DICOM series, or
    a folder of them), sorted. Nothing is read: a folder that holds no series, or a link
    to a file that does not exist, fails once, when it is predicted, and is recorded so."""
    folder = Path(inbox) / "imagesTs"
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if is_nifti(p) or (p.is_dir() and not p.name.startswith("."))
    )


def _identity(scan: Path) -> list[int] | None:
    """The scan's identity; for a link whose target is missing, the link's own (so that
    its failure is recorded once, and a fixed link is seen); None when it is gone."""
    try:
        return folder_identity(scan) if scan.is_dir() else FileIdentity.of(scan).to_list()
    except OSError:
        try:
            st = os.lstat(scan)
        except OSError:
            return None  # removed since the folder was listed: the next tick sees it
        return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def _sha256(scan: Path) -> str:
    """A file's sha256, or for a folder the sha256 of its files' names and hashes; "" for
    a scan that cannot be read (its prediction then fails, naming why, once)."""
    try:
        return _content_sha256(scan)
    except OSError:
        return ""


def _content_sha256(scan: Path) -> str:
    if not scan.is_dir():
        return file_sha256(scan)
    digest = hashlib.sha256()
    for path in sorted(p for p in scan.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(scan)}:{file_sha256(path)};".encode())
    return digest.hexdigest()


@dataclass
class Ledger:
    """``OUTPUTS/ledger.json``: one record per unlabelled scan, keyed by case id::

    {"sha256", "identity", "time", "mask" | "error", "model_version": {"run_ids",
     "models"}, "versions": [earlier predictions: {"mask", "model_version", "time"}]}
    """

    #: Where the ledger lives in OUTPUTS.
    FILE: ClassVar[str] = LEDGER

    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, outputs: Path) -> Self:
        return cls(dict(read_json(Path(outputs) / cls.FILE, {})))

    def save(self, outputs: Path) -> None:
        write_json_atomic(Path(outputs) / self.FILE, self.entries)


@dataclass(frozen=True)
class Pending:
    """An unlabelled scan to predict, and why."""

    scan: Path
    case_id: str
    sha256: str
    identity: list[int]
    reason: str  # "new", "changed", "new champion"


def to_predict(
    scans: list[Path],
    ledger: Ledger,
    champion: str | None,
    verify: bool = False,
    repredict: bool = False,
    trust_ctime: bool = True,
) -> tuple[list[Pending], list[str]]:
    """The scans to predict now, and the case ids whose identity changed but whose bytes
    did not (their new identity is recorded in ``ledger``; nothing else is done).

    A scan whose identity matches its ledger record is not read (unless ``verify``). A
    scan that failed on the same bytes before is not retried. With ``repredict``, a scan
    predicted by another run than ``champion`` is predicted again."""
    todo, touched = [], []
    for scan in scans:
        case_id = scan.name if scan.is_dir() else case_id_of(scan)
        identity = _identity(scan)
        if identity is None:
            continue
        entry = ledger.entries.get(case_id)
        recorded = {"image": entry["identity"]} if entry and entry.get("identity") else None
        trusted = (
            entry is not None
            and not verify
            and unchanged(recorded, {"image": identity}, trust_ctime)
        )
        digest = str(entry["sha256"]) if trusted and entry else _sha256(scan)
        if entry is None or entry.get("sha256") != digest:
            todo.append(Pending(scan, case_id, digest, identity, "changed" if entry else "new"))
            continue
        if not trusted and entry.get("identity") != identity:  # read, and unchanged
            ledger.entries[case_id] = {**entry, "identity": identity}
            touched.append(case_id)
        version = entry.get("model_version", {}).get("run_ids", [])
        if repredict and champion and "mask" in entry and version != [champion]:
            todo.append(Pending(scan, case_id, digest, identity, "new champion"))
    return todo, touched


def champion(runs: Path) -> str | None:
    """The run id of the registry's ensemble champion, if any."""
    return Registry.load(runs).champions.get(ENSEMBLE)


def champion_predictor(runs: Path, tta: bool) -> Any:
    """The ensemble champion's :class:`~liverpipe.infer.predict.Predictor` (imports torch)."""
    from liverpipe.infer import Predictor
    from liverpipe.models import load_cascade, pick_device

    device = pick_device()
    return Predictor([load_cascade(m, device) for m in champion_models(runs)], device, tta)


def predict_pending(
    todo: list[Pending],
    ledger: Ledger,
    runs: Path,
    outputs: Path,
    tta: bool,
    on_scan: Callable[[Pending, Mapping[str, Any] | Exception], None] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """Predict ``todo`` with the ensemble champion into OUTPUTS; the ledger is written
    after each scan, so a killed tick loses nothing. Returns (predicted, failed)."""
    predictor = champion_predictor(runs, tta)
    outputs.mkdir(parents=True, exist_ok=True)
    predicted, failed = [], {}
    for item in todo:
        base = {"sha256": item.sha256, "identity": item.identity, "time": utc_now()}
        old = ledger.entries.get(item.case_id, {})
        versions = list(old.get("versions", []))
        if item.reason == "new champion":
            versions.append(_keep_version(old, outputs))
        try:
            record = _predict_one(predictor, item, outputs)
        except Exception as err:  # this scan fails; the others go on
            # Recorded with its hash: the same bytes are not retried every tick.
            ledger.entries[item.case_id] = {**base, "error": str(err), "versions": versions}
            failed[item.case_id] = str(err)
            if on_scan:
                on_scan(item, err)
        else:
            ledger.entries[item.case_id] = {
                **base,
                "mask": record["mask"],
                "model_version": record["model_version"],
                "versions": versions,
            }
            predicted.append(item.case_id)
            if on_scan:
                on_scan(item, record)
        ledger.save(outputs)
    return predicted, failed


def _predict_one(predictor: Any, item: Pending, outputs: Path) -> dict[str, Any]:
    """One NIfTI scan, or every series of one DICOM folder (into OUTPUTS/<folder>/)."""
    from liverpipe.infer import predict_dicom, predict_file

    if not item.scan.is_dir():
        return predict_file(predictor, item.scan, outputs / f"{item.case_id}.nii.gz")
    results = predict_dicom(predictor, item.scan, outputs / item.case_id)
    failed = [str(r) for r in results.values() if isinstance(r, Exception)]
    if failed:
        raise LiverpipeError(item.scan, f"{len(failed)} series failed: {failed[0]}", "see above")
    records = [r for r in results.values() if not isinstance(r, Exception)]
    return {
        "mask": records[0]["mask"],
        "masks": [r["mask"] for r in records],
        "model_version": records[0]["model_version"],
        "tumour_count": sum(int(r["tumour_count"]) for r in records),
    }


def _keep_version(entry: Mapping[str, Any], outputs: Path) -> dict[str, Any]:
    """Move a scan's current mask and its JSON to OUTPUTS/versions/<run_id>/."""
    run_ids = entry.get("model_version", {}).get("run_ids") or ["unversioned"]
    folder = outputs / "versions" / "+".join(run_ids)
    folder.mkdir(parents=True, exist_ok=True)
    mask = Path(entry["mask"])
    kept = folder / mask.name
    for source in (
        mask,
        mask.with_name(mask.name.removesuffix(".gz").removesuffix(".nii") + ".json"),
    ):
        if source.is_file():
            shutil.move(source, folder / source.name)
    return {
        "mask": str(kept),
        "model_version": entry.get("model_version"),
        "time": entry.get("time"),
    }
