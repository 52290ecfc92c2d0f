"""A DICOMweb PACS as an inbox (``[ingest] dicomweb_url``): CT series in, DICOM-SEG back.

Each ingest tick:

1. QIDO-RS lists the PACS's CT series, page by page (``[ingest] dicomweb_lookback_days``
   limits the query to recent studies on a large archive).
2. The ledger ``OUTPUTS/pacs/ledger.json``, keyed by SeriesInstanceUID, says which to
   predict: series never seen; series whose instance count changed since (slices were
   still arriving, or more were sent); with ``repredict_on_promotion``, series predicted
   by an older champion. A series that failed is not retried until its instance count
   changes.
3. Each is retrieved with WADO-RS in the transfer syntax the PACS stores (it is not
   asked to transcode) into a temporary folder, and predicted as any DICOM series
   folder: NIfTI mask, measurements JSON and DICOM-SEG in
   ``OUTPUTS/pacs/<SeriesInstanceUID>/``.
4. The SEG is stored into the same study with STOW-RS. A failed STOW is retried on the
   next tick without predicting again.

The PACS is only read, except for the SEG instances liverpipe adds (modality SEG, which
the CT query never lists). The ledger is written after each series: a killed tick
loses nothing.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pydicom

from liverpipe.errors import LiverpipeError
from liverpipe.ops.inbox import Ledger, champion, champion_predictor

if TYPE_CHECKING:
    import requests
    from dicomweb_client.api import DICOMwebClient
from storage import utc_now

__all__ = [
    "PACS_LEDGER",
    "Pacs",
    "PacsError",
    "PacsLedger",
    "PollResult",
    "RemoteSeries",
    "poll_pacs",
    "series_to_predict",
]

PACS_LEDGER = "pacs/ledger.json"  # in OUTPUTS
#: QIDO-RS page size: Orthanc and most PACS cap a query's results at 100-1000.
PAGE = 500
_STORED = "*"  # WADO-RS: the stored transfer syntax, untouched


class PacsError(LiverpipeError):
    """The DICOMweb server did not answer, or refused a request; the message starts with
    its URL (kept whole: a URL is not a file path)."""

    def __init__(self, url: str, problem: str, fix: str) -> None:
        super().__init__(None, f"{url}: {problem}", fix)
        self.url = url


@dataclass(frozen=True)
class RemoteSeries:
    """A CT series as QIDO-RS lists it."""

    study_uid: str
    series_uid: str
    instances: int  # NumberOfSeriesRelatedInstances
    description: str = ""

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> RemoteSeries:
        ds = pydicom.Dataset.from_json(item)
        return cls(
            str(ds.get("StudyInstanceUID", "")),
            str(ds.get("SeriesInstanceUID", "")),
            int(ds.get("NumberOfSeriesRelatedInstances", 0) or 0),
            str(ds.get("SeriesDescription", "") or ""),
        )


class Pacs:
    """QIDO-RS, WADO-RS and STOW-RS on one DICOMweb server; every failure becomes a
    :class:`PacsError` that names the URL and what to check."""

    def __init__(self, url: str, timeout_s: float = 60.0) -> None:
        from dicomweb_client.api import DICOMwebClient

        self.url = url.rstrip("/")
        self._client: DICOMwebClient = DICOMwebClient(self.url, timeout=timeout_s)
        # A busy server (429, 503, 504) or a refused connection: 3 tries, 1 s then 2 s
        # apart (the client's default waits 30 s); the next tick tries again anyway.
        self._client.set_http_retry_params(max_attempts=3, wait_exponential_multiplier=500)

    def ct_series(self, since: date | None = None) -> list[RemoteSeries]:
        """Every CT series (of studies from ``since`` on), in pages of :data:`PAGE`."""
        filters = {"Modality": "CT"}
        if since is not None:
            filters["StudyDate"] = f"{since:%Y%m%d}-"
        found: list[RemoteSeries] = []
        while True:
            offset = len(found)
            page = self._call(
                "QIDO-RS series query",
                lambda: self._client.search_for_series(
                    search_filters=filters,
                    fields=["NumberOfSeriesRelatedInstances", "SeriesDescription"],
                    limit=PAGE,
                    offset=offset,  # noqa: B023 (called at once, inside this iteration)
                ),
            )
            seen = {s.series_uid for s in found}
            fresh = [RemoteSeries.from_json(item) for item in page]
            found += [s for s in fresh if s.series_uid not in seen]
            # A short page is the last; a page of nothing new means the server ignores
            # ``offset`` (it would send the same page forever).
            if len(page) < PAGE or len(found) == len(seen):
                return [s for s in found if s.series_uid]

    def retrieve(self, series: RemoteSeries, folder: Path) -> Path:
        """Write the series' instances into ``folder`` (one file each, as stored), each as
        it arrives: a series is never held in memory whole."""
        folder.mkdir(parents=True, exist_ok=True)

        def fetch() -> None:
            instances = self._client.iter_series(
                series.study_uid, series.series_uid, media_types=(("application/dicom", _STORED),)
            )
            for number, ds in enumerate(instances):
                ds.save_as(folder / f"{number:05d}.dcm", enforce_file_format=True)

        self._call(f"WADO-RS retrieval of series {series.series_uid}", fetch)
        return folder

    def store(self, path: Path) -> None:
        """STOW-RS one DICOM file (a SEG) into its study."""
        ds = pydicom.dcmread(path)
        self._call(
            f"STOW-RS of {path.name}",
            lambda: self._client.store_instances([ds], study_instance_uid=ds.StudyInstanceUID),
        )

    def _call(self, what: str, request: Callable[[], Any]) -> Any:
        import requests

        try:
            return request()
        except requests.exceptions.HTTPError as err:
            raise PacsError(
                self.url,
                f"{what} was refused: {_status(err.response)}",
                "check the server's log; the URL must be its DICOMweb root (Orthanc: "
                "http://host:8042/dicom-web)",
            ) from err
        except requests.exceptions.RequestException as err:
            raise PacsError(
                self.url,
                f"{what} failed: the DICOMweb server does not answer ({type(err).__name__})",
                "start the PACS, or correct [ingest] dicomweb_url",
            ) from err


def _status(response: requests.Response | None) -> str:
    if response is None:
        return "no response"
    return f"HTTP {response.status_code} {response.reason}"


@dataclass
class PacsLedger(Ledger):
    """``OUTPUTS/pacs/ledger.json``, keyed by SeriesInstanceUID::

    {"study", "instances", "time", "mask" | "error", "seg", "stored" (bool),
     "store_error", "model_version"}
    """

    FILE: ClassVar[str] = PACS_LEDGER


def series_to_predict(
    remote: list[RemoteSeries], ledger: PacsLedger, champion: str | None, repredict: bool
) -> tuple[list[tuple[RemoteSeries, str]], list[RemoteSeries]]:
    """(series to predict with the reason, series whose SEG still waits for its STOW)."""
    todo, unstored = [], []
    for series in remote:
        entry = ledger.entries.get(series.series_uid)
        if entry is None:
            todo.append((series, "new"))
        elif int(entry.get("instances", -1)) != series.instances:
            todo.append((series, "changed"))
        elif (
            repredict
            and champion
            and "mask" in entry
            and entry.get("model_version", {}).get("run_ids") != [champion]
        ):
            todo.append((series, "new champion"))
        elif entry.get("seg") and not entry.get("stored"):
            unstored.append(series)
    return todo, unstored


@dataclass
class PollResult:
    """What one poll did (series UIDs)."""

    found: int = 0
    predicted: list[str] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    waiting: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def poll_pacs(
    pacs: Pacs,
    runs: Path,
    outputs: Path,
    *,
    tta: bool = False,
    repredict: bool = False,
    lookback_days: int = 0,
    log: Callable[[str], None] = print,
) -> PollResult:
    """One tick against the PACS: query, predict what is new, store the SEGs back.

    Raises:
        PacsError: the query itself failed (nothing else was done). A failed retrieval,
            prediction or STOW is recorded per series and the others go on.
    """
    since = datetime.now(UTC).date() - timedelta(days=lookback_days) if lookback_days else None
    remote = pacs.ct_series(since)
    best = champion(runs)
    poll = _Poll(pacs, PacsLedger.load(outputs), outputs, PollResult(found=len(remote)), log)
    todo, unstored = series_to_predict(remote, poll.ledger, best, repredict)
    for series in unstored:
        poll.store(series)
    if todo and best is None:
        log(f"{len(todo)} PACS series wait for a champion model")
        poll.result.waiting = [s.series_uid for s, _ in todo]
    elif todo:
        predictor = champion_predictor(runs, tta)  # imports torch: only with work to do
        for series, reason in todo:
            if poll.predict(predictor, series, reason):
                poll.store(series)
    return poll.result


@dataclass
class _Poll:
    """One poll's PACS, ledger and outcome: each series is recorded (and the ledger
    saved) as soon as it is done."""

    pacs: Pacs
    ledger: PacsLedger
    outputs: Path
    result: PollResult
    log: Callable[[str], None]

    def predict(self, predictor: Any, series: RemoteSeries, reason: str) -> bool:
        """Retrieve and predict one series; True when it has a SEG to store."""
        from liverpipe.infer import predict_dicom

        uid = series.series_uid
        base = {"study": series.study_uid, "instances": series.instances, "time": utc_now()}
        source = f"{self.pacs.url}/studies/{series.study_uid}/series/{uid}"
        try:
            with tempfile.TemporaryDirectory(prefix="liverpipe-pacs-") as tmp:
                folder = self.pacs.retrieve(series, Path(tmp) / "ct")
                out = self.outputs / "pacs" / uid
                record = _one_record(predict_dicom(predictor, folder, out, seg=True, source=source))
        except PacsError as err:  # the server, not the series: not recorded, tried next tick
            self.result.failed[uid] = str(err)
            self.log(f"PACS series {uid} could not be retrieved (tried again next tick): {err}")
            return False
        except LiverpipeError as err:  # the series itself: recorded, not retried unchanged
            self.ledger.entries[uid] = {**base, "error": str(err)}
            self.result.failed[uid] = str(err)
            self.log(f"PACS series {uid} failed: {err}")
        else:
            self.ledger.entries[uid] = {
                **base,
                "mask": record["mask"],
                "seg": record.get("seg"),
                "seg_error": record.get("seg_error"),
                "stored": False,
                "model_version": record["model_version"],
            }
            self.result.predicted.append(uid)
            self.log(f"predicted PACS series {uid} ({reason}): {record['tumour_count']} lesion(s)")
        self.ledger.save(self.outputs)
        return bool(self.ledger.entries[uid].get("seg"))

    def store(self, series: RemoteSeries) -> None:
        """STOW-RS the series' SEG; a refusal is recorded and retried next tick."""
        uid = series.series_uid
        entry = self.ledger.entries[uid]
        try:
            self.pacs.store(Path(entry["seg"]))
        except PacsError as err:
            self.ledger.entries[uid] = {**entry, "stored": False, "store_error": str(err)}
            self.result.failed[uid] = str(err)
            self.log(f"the SEG of PACS series {uid} was not stored (retried next tick): {err}")
        else:
            self.ledger.entries[uid] = {**entry, "stored": True, "store_error": None}
            self.result.stored.append(uid)
        self.ledger.save(self.outputs)


def _one_record(records: dict[Path, Any]) -> dict[str, Any]:
    """The series' record; the retrieved folder holds that one series."""
    outcomes = list(records.values())
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            raise outcome
    if len(outcomes) != 1:
        raise LiverpipeError(
            None,
            f"the PACS returned {len(outcomes)} series for one SeriesInstanceUID",
            "check the PACS index for instances filed under the wrong series",
        )
    return dict(outcomes[0])
