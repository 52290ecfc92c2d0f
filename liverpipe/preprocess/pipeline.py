"""Incremental preprocessing of a dataset into a slice store.

``plan`` decides, by content hash and config hash, which cases need work; ``run``
executes them through any runner (Dask by default, a Prefect task runner in flows)
and commits each result to the manifest as it arrives, so a killed run keeps its
progress and a rerun resumes.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from liverpipe import __version__
from liverpipe._system import available_cpus
from liverpipe.io import CaseFiles, case_identity, discover, file_sha256, unchanged
from liverpipe.preprocess.case import (
    HIST_BINS,
    HIST_LOW,
    CaseJob,
    CaseResult,
    combine_hashes,
    foreground_histogram,
    ingest_case,
)
from liverpipe.preprocess.kernels import ZScoreStats
from liverpipe.settings import PreprocessConfig, Settings
from storage import SCHEMA_VERSION, SPLITS, ManifestEntry, SliceStore, Split, StoreError, utc_now

__all__ = [
    "Plan",
    "RunSummary",
    "Runner",
    "assign_split",
    "assign_splits",
    "effective_config_hash",
    "largest_first",
    "needs_record",
    "needs_workers",
    "pending",
    "plan",
    "preprocess_dataset",
    "serial_runner",
]

Runner = Callable[[Callable[[Any], Any], Sequence[Any], Sequence[str]], Iterator[tuple[Any, Any]]]


def assign_split(case_id: str, fractions: tuple[float, float, float], salt: str) -> Split:
    """The hash split of a case id alone (see :func:`assign_splits` for small datasets)."""
    u = _split_u(case_id, salt)
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def _split_u(case_id: str, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}:{case_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(
    new_ids: Sequence[str],
    existing: Mapping[str, Split],
    fractions: tuple[float, float, float],
    salt: str,
) -> dict[str, Split]:
    """Splits for new cases, never moving an ``existing`` one.

    Each new case takes its hash split (:func:`assign_split`). An empty split then takes
    one new case, the one whose hash is nearest that split's band: train first, whatever
    the number of cases (one case alone is a train case, so that a model can be trained),
    then, once there are 3 or more cases, val and test (those with a non-zero fraction),
    each from a split that keeps at least one case. So small datasets always have a case
    to train on, one to validate and one to test on, and a case never changes split when
    more cases arrive.
    """
    out = {cid: assign_split(cid, fractions, salt) for cid in sorted(new_ids)}
    targets: list[tuple[int, Split]] = [(0, "train")]
    if len(existing) + len(out) >= len(SPLITS):
        targets += [(1, "val"), (2, "test")]
    for index, split in targets:
        counts = Counter([*existing.values(), *out.values()])
        if fractions[index] == 0 or counts[split]:
            continue
        band = (sum(fractions[:index]), sum(fractions[: index + 1]))
        middle = (band[0] + band[1]) / 2
        movable = [c for c in out if split == "train" or counts[out[c]] > 1]
        if movable:
            chosen = min(movable, key=lambda c: (abs(_split_u(c, salt) - middle), c))
            out[chosen] = split
    return out


#: Revision of the forward path's output. Bump it when a change alters stored arrays for
#: the same input and config (2: end slices clamped to the scan's edge voxels), so that
#: stores made before it reprocess their cases instead of being refused.
FORWARD_REVISION = 2


def effective_config_hash(config: PreprocessConfig, zscore: ZScoreStats | None) -> str:
    """Hash of everything that shapes stored arrays: config, z-score stats, schema version."""
    payload = {
        "schema": SCHEMA_VERSION,
        "forward": FORWARD_REVISION,
        "preprocess": config.model_dump(mode="json"),
        "zscore": None if zscore is None else zscore.__dict__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def serial_runner(
    fn: Callable[[Any], Any], items: Sequence[Any], keys: Sequence[str]
) -> Iterator[tuple[Any, Any]]:
    """Run in this process, in order (tests, debugging)."""
    for item in items:
        try:
            yield item, fn(item)
        except Exception as err:
            yield item, err


def largest_first(jobs: list[CaseJob]) -> list[CaseJob]:
    """Jobs ordered by their image file's size, largest first (stable among equals).

    Workers take tasks in submission order, so the largest cases start first and the
    last task to finish is a small one: the tail in which some workers sit idle is
    shortest (longest-processing-time-first scheduling, with file size as the cost).
    """
    return sorted(jobs, key=lambda job: -(job.identity or {}).get("image", [0])[0])


@dataclass(frozen=True)
class Plan:
    """What a run will do. ``sources`` maps case id to its combined source hash."""

    todo: list[CaseJob]
    skipped: list[str]
    invalid: list[CaseFiles]
    missing: list[str]
    unlabelled: list[str]
    sources: dict[str, str]
    #: Cases that failed on these very files and this config before: not retried.
    still_failed: dict[str, str] = field(default_factory=dict)
    #: Cases whose files changed identity but not content: their new identities.
    touched: dict[str, dict[str, list[int]]] = field(default_factory=dict)


@dataclass
class RunSummary:
    processed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unlabelled: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)
    warnings: dict[str, list[str]] = field(default_factory=dict)
    still_failed: dict[str, str] = field(default_factory=dict)
    rehashed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and not self.still_failed

    @property
    def cases_per_minute(self) -> float:
        return 60.0 * len(self.processed) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "processed": self.processed,
            "skipped": self.skipped,
            "failed": self.failed,
            "missing_sources": self.missing,
            "unlabelled_not_stored": self.unlabelled,
            "recovered": self.recovered,
            "warnings": self.warnings,
            "still_failed_unchanged": self.still_failed,
            "rehashed_unchanged": self.rehashed,
            "seconds": round(self.seconds, 2),
            "cases_per_minute": round(self.cases_per_minute, 2),
        }


def _source_hashes(cases: Sequence[CaseFiles], threads: int) -> dict[str, str]:
    def one(case: CaseFiles) -> str:
        assert case.image is not None
        return combine_hashes(
            file_sha256(case.image), file_sha256(case.label) if case.label else None
        )

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return dict(zip((c.case_id for c in cases), pool.map(one, cases), strict=True))


def plan(
    data_dir: Path,
    store_root: Path,
    entries: Mapping[str, ManifestEntry],
    settings: Settings,
    config_hash: str,
    zscore: ZScoreStats | None,
    *,
    threads: int = 2,
    sticky_splits: bool = True,
    verify: bool = False,
) -> Plan:
    """Compare the sources with the manifest ``entries``: only new or changed cases (or
    every case, after a config change) become jobs.

    A source whose file identity (:mod:`liverpipe.io.identity`) matches its entry's is not
    read; the others are hashed, and one whose hash is unchanged only has its identity
    refreshed (``touched``). ``verify`` hashes every source.

    A case keeps the split its manifest entry records (``sticky_splits``, unless the split
    rule changed); new cases get theirs from :func:`assign_splits`. ``settings`` gives the
    preprocessing, the checks and whether file ctimes are trusted."""
    config = settings.preprocess
    index = discover(data_dir)
    labelled = [
        c for c in index.training if not c.problems and c.image is not None and c.label is not None
    ]
    # A stored case that lost its image or label is a missing source, not a failure.
    incomplete = {c.case_id for c in index.training if c.image is None or c.label is None}
    kept = {cid for cid in incomplete if cid in entries and entries[cid].status == "ok"}
    invalid = [c for c in index.training if c.problems and c.case_id not in kept]
    unlabelled = [c.case_id for c in index.cases if c.role == "test"]
    identities = {c.case_id: case_identity(c.image, c.label) for c in labelled}  # type: ignore[arg-type]
    known = {
        c.case_id: entries[c.case_id].source_sha256
        for c in labelled
        if not verify
        and c.case_id in entries
        and entries[c.case_id].source_sha256
        and unchanged(
            entries[c.case_id].identity, identities[c.case_id], settings.ingest.trust_ctime
        )
    }
    # New cases are work whatever their content: the task hashes their bytes as it
    # decodes them (one read), so only known cases whose identity changed are hashed here.
    rehash = [c for c in labelled if c.case_id not in known and c.case_id in entries]
    fresh = {c.case_id: "" for c in labelled if c.case_id not in entries}
    sources = {**known, **fresh, **_source_hashes(rehash, threads)}
    touched = {
        c.case_id: identities[c.case_id]
        for c in rehash
        if c.case_id in entries
        and entries[c.case_id].source_sha256 == sources[c.case_id]
        and entries[c.case_id].identity != identities[c.case_id]
    }
    todo: list[CaseJob] = []
    skipped = []
    still_failed: dict[str, str] = {}
    for case in labelled:
        entry = entries.get(case.case_id)
        current = (
            entry is not None
            and entry.status == "ok"
            and entry.source_sha256 == sources[case.case_id]
            and entry.config_hash == config_hash
        )
        known_bad = (
            entry is not None
            and entry.status == "failed"
            and entry.permanent
            and entry.source_sha256 == sources[case.case_id]
            and entry.config_hash == config_hash
        )
        if current:
            skipped.append(case.case_id)
        elif known_bad:
            assert entry is not None
            still_failed[case.case_id] = entry.error or "failed"
        else:
            assert case.image is not None
            todo.append(
                CaseJob(
                    case.case_id,
                    case.image,
                    case.label,
                    store_root,
                    config,
                    config_hash,
                    zscore,
                    limits=settings.check,
                    identity=identities[case.case_id],
                )
            )
    splits = _splits_for([j.case_id for j in todo], entries, config, sticky_splits)
    todo = largest_first([replace(j, split=splits[j.case_id]) for j in todo])
    seen = {c.case_id for c in index.training}
    missing = sorted(cid for cid in entries if cid not in seen or cid in kept)
    touched = {cid: ident for cid, ident in touched.items() if cid not in {j.case_id for j in todo}}
    return Plan(todo, skipped, invalid, missing, unlabelled, sources, still_failed, touched)


def _splits_for(
    todo: Sequence[str],
    entries: Mapping[str, ManifestEntry],
    config: PreprocessConfig,
    sticky: bool,
) -> dict[str, Split]:
    """The split of each case to process: its recorded one, or a new assignment."""
    wanted = set(todo)
    kept: dict[str, Split] = {
        cid: e.split for cid, e in entries.items() if sticky and (e.status == "ok" or cid in wanted)
    }
    new = [cid for cid in todo if cid not in kept]
    assigned = assign_splits(new, kept, config.split_fractions, config.split_salt)
    return {cid: kept.get(cid) or assigned[cid] for cid in todo}


def _case_sha256(job: CaseJob) -> str:
    """A case's source hash, for a failure that came before the task hashed it (so the
    same files are recognised, and not retried, next time)."""
    try:
        label = file_sha256(job.label) if job.label else None
        return combine_hashes(file_sha256(job.image), label)
    except OSError:
        return ""


def _entry(job: CaseJob, result: CaseResult | BaseException, source: str) -> ManifestEntry:
    """The manifest record of a finished task (a task that raised is a failed case)."""
    now = utc_now()
    if isinstance(result, BaseException):
        result = CaseResult(
            job.case_id,
            False,
            source,
            error=f"{job.image}: the task died ({type(result).__name__}: {result}). "
            "Fix: rerun; if it repeats, check the worker's memory.",
        )
    return ManifestEntry(
        case_id=job.case_id,
        status="ok" if result.ok else "failed",
        split=job.split,
        source_sha256=result.source_sha256 or source or _case_sha256(job),
        config_hash=job.config_hash,
        image=str(job.image),
        label=str(job.label) if job.label else None,
        created=now,
        updated=now,
        error=result.error,
        shape=result.shape,
        warnings=result.warnings,
        permanent=result.permanent,
        identity=job.identity,
    )


def zscore_statistics(
    jobs: Sequence[CaseJob], runner: Runner, percentiles: tuple[float, float]
) -> ZScoreStats:
    """Dataset foreground statistics from the train split's label > 0 voxels (as nnU-Net)."""
    total = np.zeros(HIST_BINS, dtype=np.int64)
    for _, hist in runner(foreground_histogram, jobs, [f"hist-{j.case_id}" for j in jobs]):
        if isinstance(hist, np.ndarray):
            total += hist
    if total.sum() == 0:
        raise ValueError("no labelled foreground voxels to compute z-score statistics from")
    values = np.arange(total.size) + HIST_LOW
    cdf = np.cumsum(total) / total.sum()
    low, high = (float(values[np.searchsorted(cdf, p / 100)]) for p in percentiles)
    clipped = np.clip(values, low, high)
    mean = float((clipped * total).sum() / total.sum())
    std = float(np.sqrt(((clipped - mean) ** 2 * total).sum() / total.sum()))
    return ZScoreStats(low, high, mean, max(std, 1e-3))


def preprocess_dataset(
    data_dir: Path,
    store_path: Path,
    settings: Settings,
    runner: Runner,
    *,
    on_result: Callable[[str, bool], None] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    verify: bool = False,
) -> RunSummary:
    """Bring the store up to date with ``data_dir``; see the module docstring.

    ``verify`` re-hashes every source instead of trusting unchanged file identities."""
    start = time.perf_counter()
    cfg = settings.preprocess
    summary = RunSummary()
    zscore = _existing_zscore(store_path, cfg) if cfg.normalization == "zscore" else None
    if cfg.normalization == "zscore" and zscore is None:
        probe = plan(data_dir, store_path, {}, settings, "", None)
        train = [
            j
            for j in probe.todo
            if assign_split(j.case_id, cfg.split_fractions, cfg.split_salt) == "train"
        ]
        zscore = zscore_statistics(train or probe.todo, runner, cfg.zscore_percentiles)
    config_hash = effective_config_hash(cfg, zscore)
    config_record = {
        "preprocess": cfg.model_dump(mode="json"),
        "zscore": None if zscore is None else zscore.__dict__,
    }
    store = SliceStore.open_or_create(store_path, config_hash, config_record, __version__)
    with store.lock(settings.store.stale_lock_seconds):
        summary.recovered = store.recover()
        store.reload()
        sticky = _split_rule(store.meta.config) == _split_rule(config_record)
        if store.meta.config_hash != config_hash:
            store.set_config(config_hash, config_record)
        work = _plan_store(data_dir, store, settings, config_hash, zscore, verify, sticky=sticky)
        if on_plan:
            on_plan(work)
        summary.skipped, summary.unlabelled = work.skipped, work.unlabelled
        summary.still_failed = work.still_failed
        _record_invalid(store, work, cfg, config_hash, summary)
        _record_missing(store, work, summary)
        _record_touched(store, work, summary)
        for job, result in runner(
            ingest_case, work.todo, [f"ingest-{j.case_id}" for j in work.todo]
        ):
            entry = _entry(job, result, work.sources[job.case_id])
            store.commit(entry)
            if entry.warnings:
                summary.warnings[job.case_id] = list(entry.warnings)
            if entry.status == "ok":
                summary.processed.append(job.case_id)
            else:
                summary.failed[job.case_id] = entry.error or "failed"
            if on_result:
                on_result(job.case_id, entry.status == "ok")
    summary.seconds = time.perf_counter() - start
    return summary


def pending(
    data_dir: Path, store_path: Path, settings: Settings, verify: bool = False
) -> Plan | None:
    """What :func:`preprocess_dataset` would do now, found without the lock, a cluster or
    any write; None when everything would be work (no store yet, or a changed config)."""
    cfg = settings.preprocess
    try:
        store = SliceStore.open(store_path)
    except StoreError:
        return None
    zscore = _existing_zscore(store_path, cfg) if cfg.normalization == "zscore" else None
    if cfg.normalization == "zscore" and zscore is None:
        return None
    config_hash = effective_config_hash(cfg, zscore)
    if store.meta.config_hash != config_hash:
        return None
    return _plan_store(data_dir, store, settings, config_hash, zscore, verify)


def _plan_store(
    data_dir: Path,
    store: SliceStore,
    settings: Settings,
    config_hash: str,
    zscore: ZScoreStats | None,
    verify: bool,
    *,
    sticky: bool = True,
) -> Plan:
    return plan(
        data_dir,
        store.root,
        store.manifest.entries,
        settings,
        config_hash,
        zscore,
        threads=available_cpus(),
        sticky_splits=sticky,
        verify=verify,
    )


def needs_workers(work: Plan | None, entries: Mapping[str, ManifestEntry]) -> bool:
    """Whether ``work`` has cases to preprocess (or, for None, everything): only then is a
    Dask cluster worth starting. Invalid cases already recorded with the same problem
    and files are not work."""
    if work is None or work.todo:
        return True
    for case in work.invalid:
        old = entries.get(case.case_id)
        if old is None or old.status != "failed" or old.error != " ".join(case.problems):
            return True
    return False


def needs_record(work: Plan, entries: Mapping[str, ManifestEntry]) -> bool:
    """Whether the manifest has something to note without any preprocessing: touched
    files' identities, or sources that went missing or came back."""
    flagged = {cid for cid, e in entries.items() if e.source_missing}
    return bool(work.touched) or flagged != set(work.missing)


def _record_invalid(
    store: SliceStore, work: Plan, cfg: PreprocessConfig, config_hash: str, summary: RunSummary
) -> None:
    for case in work.invalid:
        now = utc_now()
        error = " ".join(case.problems)
        old = store.manifest.entries.get(case.case_id)
        split = (
            old.split if old else assign_split(case.case_id, cfg.split_fractions, cfg.split_salt)
        )
        image = str(case.image) if case.image else ""
        store.commit(
            ManifestEntry(
                case.case_id,
                "failed",
                split,
                "",
                config_hash,
                image,
                str(case.label) if case.label else None,
                now,
                now,
                error,
            )
        )
        summary.failed[case.case_id] = error


def _record_touched(store: SliceStore, work: Plan, summary: RunSummary) -> None:
    """Files whose identity changed but whose bytes did not: new identities, no work."""
    for case_id, identity in work.touched.items():
        entry = store.manifest.entries[case_id]
        store.manifest.upsert(replace(entry, identity=identity, updated=utc_now()))
    if work.touched:
        store.manifest.save()
    summary.rehashed = sorted(work.touched)


def _record_missing(store: SliceStore, work: Plan, summary: RunSummary) -> None:
    for case_id in work.missing:
        entry = store.manifest.entries[case_id]
        if not entry.source_missing:
            store.commit(replace(entry, source_missing=True, updated=utc_now()))
    for case_id, entry in list(store.manifest.entries.items()):
        if entry.source_missing and case_id not in work.missing:
            store.commit(replace(entry, source_missing=False, updated=utc_now()))
    summary.missing = work.missing


def _split_rule(record: Mapping[str, Any]) -> tuple[Any, Any]:
    """The settings that decide splits, from a store's config record."""
    preprocess = record.get("preprocess", {})
    return preprocess.get("split_fractions"), preprocess.get("split_salt")


def _existing_zscore(store_path: Path, cfg: PreprocessConfig) -> ZScoreStats | None:
    """Reuse the store's z-score statistics when its preprocessing config is unchanged."""
    try:
        meta = SliceStore.open(store_path).meta
    except StoreError:  # no store yet, or one this version cannot read
        return None
    record = meta.config
    if record.get("preprocess") != cfg.model_dump(mode="json") or not record.get("zscore"):
        return None
    return ZScoreStats(**record["zscore"])
