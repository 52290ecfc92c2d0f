"""Store contract: atomic case commits, manifest, lock, schema checks, 2.5D reads."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from liverpipe.errors import StoreSchemaError
from storage import (
    CaseMeta,
    CaseReader,
    Intensity,
    ManifestEntry,
    SliceStore,
    StoreLock,
    StoreLockedError,
    utc_now,
    window_indices,
)


def _meta(case_id: str, shape: tuple[int, int, int] = (5, 8, 8)) -> CaseMeta:
    return CaseMeta(
        case_id=case_id,
        shape=shape,
        spacing=(1.0, 1.0, 2.5),
        affine=tuple(tuple(r) for r in np.diag([1.0, 1.0, 2.5, 1.0]).tolist()),
        original_shape=(8, 8, 5),
        original_affine=tuple(tuple(r) for r in np.eye(4).tolist()),
        crop_offset=(0, 0, 0),
        source_sha256="abc",
        config_hash="cfg",
        slice_counts={"liver": [0] * shape[0], "tumour": [0] * shape[0]},
        hu_stats={"body_mean": 1.0},
        intensity=Intensity("window", "float16", 1.0, 0.0, 450.0, -200.0),
        source_image="/data/x.nii.gz",
    )


def _entry(case_id: str, status: str = "ok") -> ManifestEntry:
    now = utc_now()
    return ManifestEntry(case_id, status, "train", "abc", "cfg", "/x", "/y", now, now)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> SliceStore:
    return SliceStore.create(tmp_path / "s.zarr", "cfg", {"preprocess": {}}, "test")


def test_write_commit_read_round_trip(store: SliceStore) -> None:
    image = np.random.default_rng(0).random((5, 8, 8)).astype(np.float16)
    label = (image > 0.5).astype(np.uint8)
    store.write_case(_meta("a"), image, label)
    assert store.cases() == []  # written but not committed: invisible
    store.commit(_entry("a"))
    reopened = SliceStore.open(store.root)
    assert reopened.cases() == ["a"] and reopened.cases("val") == []
    case = reopened.case("a")
    got_image, got_label = case.load()
    np.testing.assert_array_equal(got_image, image)
    np.testing.assert_array_equal(got_label, label)
    assert case.meta == CaseMeta.from_dict(case.meta.to_dict())
    assert case.image.chunks == (4, 8, 8)


def test_rewrite_replaces_a_case_whole(store: SliceStore) -> None:
    store.write_case(_meta("a"), np.zeros((5, 8, 8), np.float16), np.zeros((5, 8, 8), np.uint8))
    store.write_case(
        _meta("a", (3, 8, 8)), np.ones((3, 8, 8), np.float16), np.ones((3, 8, 8), np.uint8)
    )
    store.commit(_entry("a"))
    image, _ = store.case("a").load()
    assert image.shape == (3, 8, 8) and (image == 1).all()
    assert sorted(p.name for p in (store.root / "cases").iterdir() if p.is_dir()) == ["a"]


def test_recover_removes_half_written_cases_and_restores_swaps(store: SliceStore) -> None:
    store.write_case(_meta("a"), np.zeros((5, 8, 8), np.float16), np.zeros((5, 8, 8), np.uint8))
    store.commit(_entry("a"))
    cases = store.root / "cases"
    (cases / ".tmp-b-123").mkdir()
    (cases / "a").rename(cases / ".trash-a-456")  # killed between the two renames of a swap
    cleaned = store.recover()
    assert sorted(cleaned) == [".tmp-b-123", ".trash-a-456"]
    assert sorted(p.name for p in cases.iterdir() if p.is_dir()) == ["a"]
    assert store.case("a").load()[0].shape == (5, 8, 8)


def test_failed_and_stale_cases_are_not_served(store: SliceStore) -> None:
    for cid in ("a", "b"):
        store.write_case(_meta(cid), np.zeros((5, 8, 8), np.float16), np.zeros((5, 8, 8), np.uint8))
    store.commit(_entry("a"))
    store.commit(_entry("b", "failed"))
    assert store.cases() == ["a"]
    with pytest.raises(KeyError, match="failed"):
        store.case("b")
    store.set_config("new", {"preprocess": {"x": 1}})
    assert SliceStore.open(store.root).cases() == []  # made with the old config
    info = store.info()
    assert [c["status"] for c in info["cases"]] == ["stale", "stale"]


def test_manifest_is_replaced_atomically(store: SliceStore) -> None:
    store.commit(_entry("a"))
    files = sorted(p.name for p in store.root.iterdir())
    assert files == ["cases", "manifest.json", "zarr.json"]  # no temp file left behind
    data = json.loads((store.root / "manifest.json").read_text())
    assert [c["case_id"] for c in data["cases"]] == ["a"]


def test_schema_version_and_non_stores_are_refused(tmp_path: Path, store: SliceStore) -> None:
    zarr_json = store.root / "zarr.json"
    meta = json.loads(zarr_json.read_text())
    meta["attributes"]["liverpipe"]["schema_version"] = 999
    zarr_json.write_text(json.dumps(meta))
    with pytest.raises(StoreSchemaError, match=r"schema version 999.*new --store path"):
        SliceStore.open(store.root)
    with pytest.raises(StoreSchemaError, match="no slice store here"):
        SliceStore.open(tmp_path / "nothing")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(StoreSchemaError, match="not empty"):
        SliceStore.create(tmp_path / "busy", "h", {}, "v")
    for path in (tmp_path / "busy" / "file", tmp_path / "busy" / "file" / "s.zarr"):
        with pytest.raises(StoreSchemaError, match=r"this is a file, so .* cannot be a store"):
            SliceStore.open_or_create(path, "h", {}, "v")  # as the preprocess flow does


def test_lock_names_its_holder_and_refuses_a_second_writer(store: SliceStore) -> None:
    with store.lock():
        holder = json.loads((store.root / ".lock").read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
            StoreLock(store.root).__enter__()
    assert not (store.root / ".lock").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(store: SliceStore) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    (store.root / ".lock").write_text(
        json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": 0})
    )
    with store.lock() as lock:
        assert lock.taken_over is not None and lock.taken_over["pid"] == int(dead.stdout)


def test_lock_from_another_host(store: SliceStore) -> None:
    (store.root / ".lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0}))
    with pytest.raises(StoreLockedError, match="host elsewhere"):
        store.lock().__enter__()
    with store.lock(stale_after=60.0):  # started at epoch 0: far older than 60 s
        pass


def test_window_indices_replicate_edges() -> None:
    assert window_indices(0, 3, 10).tolist() == [0, 0, 1]
    assert window_indices(9, 5, 10).tolist() == [7, 8, 9, 9, 9]
    assert window_indices(4, 1, 10).tolist() == [4]
    with pytest.raises(ValueError, match="odd"):
        window_indices(4, 2, 10)


def test_reader_returns_k_adjacent_slices(store: SliceStore) -> None:
    image = np.arange(5 * 8 * 8, dtype=np.float16).reshape(5, 8, 8)
    label = (np.arange(5)[:, None, None] * np.ones((5, 8, 8))).astype(np.uint8)
    store.write_case(_meta("a"), image, label)
    store.commit(_entry("a"))
    reader = CaseReader(store, k=3)
    block, lab = reader.sample("a", 0)
    np.testing.assert_array_equal(block, image[[0, 0, 1]])
    assert (lab == 0).all()
    block, lab = reader.sample("a", 3)
    np.testing.assert_array_equal(block, image[[2, 3, 4]])
    assert (lab == 3).all()
    with pytest.raises(IndexError, match="outside case 'a'"):
        reader.sample("a", 5)


@pytest.mark.parametrize("k", [1, 3, 5, 9])
def test_chunk_cache_gives_the_same_samples_and_stays_in_its_budget(
    store: SliceStore, k: int
) -> None:
    """Every slice of a 13-slice case (chunks of 4, windows across chunk edges and both
    ends), read through an LRU that holds 2 chunks, equals the uncached read."""
    rng = np.random.default_rng(k)
    image = rng.normal(size=(13, 8, 8)).astype(np.float16)
    label = rng.integers(0, 3, size=(13, 8, 8)).astype(np.uint8)
    store.write_case(_meta("a", (13, 8, 8)), image, label)
    store.commit(_entry("a"))
    plain = CaseReader(store, k=k)
    chunk_bytes = 4 * 8 * 8 * 3  # float16 image + uint8 label
    cached = CaseReader(store, k=k, cache_bytes=2 * chunk_bytes)
    order = [*range(13), *rng.permutation(13), 12, 12, 0]
    for z in order:
        want, want_label = plain.sample("a", int(z))
        got, got_label = cached.sample("a", int(z))
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got_label, want_label)
        np.testing.assert_array_equal(want[k // 2], image[z])
        assert cached.cache.bytes <= 2 * chunk_bytes
    assert cached.cache.hits > 0 and cached.cache.misses > 0
    got_label[:] = 7  # a caller's copy: the cache is not changed through it
    assert cached.sample("a", 12)[1].max() <= 2
