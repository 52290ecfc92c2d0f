"""`liverpipe preprocess` / `store info` as users run them: real Dask, real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import REPO, ct_volume, write_nifti

from storage import SliceStore

CLI = [sys.executable, "-m", "liverpipe.cli"]
TINY = str(REPO / "configs" / "tiny.toml")


def _run(*args: str, check_rc: int | None = 0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*CLI, *args], capture_output=True, text=True, cwd=REPO, timeout=300, check=False
    )
    if check_rc is not None:
        assert result.returncode == check_rc, result.stdout + result.stderr
    return result


def _many(phantom_dir: Path, root: Path, copies: int) -> Path:
    """The session phantoms copied under ``copies`` x 4 case ids (no dataset.json)."""
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
        for i in range(copies):
            for path in sorted((phantom_dir / sub).iterdir()):
                shutil.copyfile(path, root / sub / f"c{i:02d}_{path.name}")
    return root


def test_cli_preprocess_then_rerun_then_info(tmp_path: Path, phantom_dir: Path) -> None:
    store = tmp_path / "s.zarr"
    first = json.loads(
        _run(
            "preprocess", str(phantom_dir), "--store", str(store), "--config", TINY, "--json"
        ).stdout
    )
    assert len(first["processed"]) == 4 and first["failed"] == {} and first["cases_per_minute"] > 0
    second = json.loads(
        _run(
            "preprocess", str(phantom_dir), "--store", str(store), "--config", TINY, "--json"
        ).stdout
    )
    assert second["processed"] == [] and len(second["skipped"]) == 4
    info = json.loads(_run("store", "info", str(store), "--json").stdout)
    assert info["schema_version"] == 1 and len(info["config_hash"]) == 16
    assert {c["case_id"] for c in info["cases"]} == {f"phantom_{i:03d}" for i in range(4)}
    case = info["cases"][0]
    assert set(case) >= {"case_id", "status", "split", "shape", "spacing", "source_sha256", "error"}
    assert (
        case["status"] == "ok"
        and case["spacing"] == [5.0, 5.0, 5.0]
        and case["shape"][1:] == [64, 64]
    )
    table = _run("store", "info", str(store)).stdout
    assert "phantom_000" in table and "ok" in table


def test_cli_exit_code_1_with_bad_case_and_good_cases_stored(
    tmp_path: Path, phantom_dir: Path
) -> None:
    data = Path(shutil.copytree(phantom_dir, tmp_path / "d"))
    (data / "dataset.json").unlink()
    write_nifti(data / "imagesTr" / "bad.nii.gz", ct_volume((8, 8, 8)))
    write_nifti(data / "labelsTr" / "bad.nii.gz", np.full((8, 8, 8), 9, np.uint8))
    result = _run(
        "preprocess", str(data), "--store", str(tmp_path / "s.zarr"), "--config", TINY, check_rc=1
    )
    assert "processed 4, skipped 0, failed 1" in result.stdout
    assert "bad.nii.gz: label values must be" in result.stderr
    assert len(SliceStore.open(tmp_path / "s.zarr").cases()) == 4


def test_kill_9_mid_run_then_rerun_resumes(tmp_path: Path, phantom_dir: Path) -> None:
    data = _many(phantom_dir, tmp_path / "d", 10)  # 40 cases
    store = tmp_path / "s.zarr"
    # Default-sized slices (384x384) so that the run lasts long enough to be killed.
    proc = subprocess.Popen(
        [*CLI, "preprocess", str(data), "--store", str(store), "--workers", "2"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    manifest = store / "manifest.json"
    deadline = time.time() + 240
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists():
            try:
                done = len(json.loads(manifest.read_text())["cases"])
            except json.JSONDecodeError:
                done = 0
        if done >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= done < 40, f"could not interrupt the run mid-way ({done} cases done)"
    assert (store / ".lock").exists()  # the dead run's lock is still there
    result = _run("preprocess", str(data), "--store", str(store), "--json")
    summary = json.loads(result.stdout)
    assert (
        len(summary["skipped"]) >= done - 2
        and len(summary["processed"]) + len(summary["skipped"]) == 40
    )
    reopened = SliceStore.open(store)
    assert len(reopened.cases()) == 40
    dirs = sorted(p.name for p in (store / "cases").iterdir() if p.is_dir())
    assert dirs == sorted(reopened.cases())  # each case exactly once, no temp or trash left
    for case_id in reopened.cases():
        image, label = reopened.case(case_id).load()
        assert image.shape == label.shape == reopened.case(case_id).meta.shape


def test_external_cluster_gives_the_same_store(
    tmp_path: Path, phantom_dir: Path, external_cluster: str
) -> None:
    remote, local = tmp_path / "remote.zarr", tmp_path / "local.zarr"
    _run(
        "preprocess",
        str(phantom_dir),
        "--store",
        str(remote),
        "--config",
        TINY,
        "--dask-address",
        external_cluster,
    )
    _run("preprocess", str(phantom_dir), "--store", str(local), "--config", TINY)
    a, b = SliceStore.open(remote), SliceStore.open(local)
    assert (
        a.meta.config_hash == b.meta.config_hash and a.cases() == b.cases() and len(a.cases()) == 4
    )
    for case_id in a.cases():
        ca, cb = a.case(case_id), b.case(case_id)
        for x, y in zip(ca.load(), cb.load(), strict=True):
            np.testing.assert_array_equal(x, y)
        assert ca.meta == cb.meta


def test_local_cluster_workers_keep_glibc_malloc_thresholds() -> None:
    """Dask's nanny would start workers with MALLOC_TRIM_THRESHOLD_=65536 (a page fault
    storm on every large array, docs/preprocessing.md); liverpipe's LocalCluster workers
    start without it and can trim their heap after each case."""
    import dask

    from liverpipe._system import _malloc_trim
    from liverpipe.preprocess import dask_client

    assert dask.config.get("distributed.nanny.pre-spawn-environ")["MALLOC_TRIM_THRESHOLD_"] is None
    with dask_client(1) as client:
        found = client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_")
        trims = client.run(lambda: _malloc_trim() is not None)
    assert list(found.values()) == [None]
    assert list(trims.values()) == [sys.platform == "linux"]
