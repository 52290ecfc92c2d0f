"""Shared fixtures: tiny NIfTI writers, the real CT fixture, a small phantom dataset."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
REAL_CT_DIR = REPO.parent / "shared" / "data" / "real-ct"


def write_nifti(
    path: Path,
    data: np.ndarray,
    affine: np.ndarray | None = None,
    *,
    version: int = 1,
    slope_inter: tuple[float, float] | None = None,
) -> Path:
    """Write ``data`` (file voxel order) with sform and qform set to ``affine``."""
    affine = np.diag([1.0, 1.0, 2.0, 1.0]) if affine is None else affine
    cls = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    image = cls(data, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    if slope_inter is not None:
        image.header.set_slope_inter(*slope_inter)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


def copy_runs(source: Path, target: Path) -> Path:
    """Copy a runs folder, hard-linking its checkpoints (hundreds of MB per run; CI disks
    are small). Checkpoints are only ever replaced by a rename, never written in place, so
    the source stays intact; every other file is a real copy that a test may edit."""
    import shutil

    def copy(src: str, dst: str) -> None:
        if src.endswith(".pt"):
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)

    return Path(shutil.copytree(source, target, copy_function=copy))


def ct_volume(shape: tuple[int, ...], tissue: int = 40) -> np.ndarray:
    """int16 soft tissue (``tissue`` HU) framed by one voxel of air (-1000 HU): the least
    that reads as a CT in HU."""
    volume = np.full(shape, -1000, dtype=np.int16)
    volume[tuple(slice(1, max(n - 1, 1)) for n in shape)] = tissue
    return volume


@pytest.fixture
def tiny_case(tmp_path: Path) -> Path:
    """A valid 2-case MSD-style dataset of 8x9x10 volumes; returns its root."""
    rng = np.random.default_rng(0)
    for name in ("case_a", "case_b"):
        image = rng.integers(-200, 200, size=(8, 9, 10)).astype(np.int16)
        label = np.zeros((8, 9, 10), dtype=np.uint8)
        label[2:6, 2:6, 2:6] = 1
        label[3:4, 3:4, 3:4] = 2
        write_nifti(tmp_path / "imagesTr" / f"{name}.nii.gz", image)
        write_nifti(tmp_path / "labelsTr" / f"{name}.nii.gz", label)
    return tmp_path


@pytest.fixture(scope="session")
def real_ct() -> tuple[Path, Path]:
    """Paths of the real CT scan and its liver mask (see shared/data/real-ct/README.md)."""
    ct, liver = REAL_CT_DIR / "ct.nii.gz", REAL_CT_DIR / "liver.nii.gz"
    if not ct.is_file():
        pytest.fail(f"the real CT fixture is missing at {ct}; the repo expects ../shared beside it")
    return ct, liver


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-case small phantom dataset (seed 0), shared by the session; do not modify."""
    from liverpipe.synth import generate_dataset

    root = tmp_path_factory.mktemp("phantoms")
    generate_dataset(root, 4, seed=0, size="small", workers=1)
    return root


@pytest.fixture(scope="session")
def tiny_store(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session phantoms preprocessed with configs/tiny.toml (64x64 slices)."""
    from liverpipe.preprocess import preprocess_dataset, serial_runner
    from liverpipe.settings import load_settings

    store = tmp_path_factory.mktemp("store") / "tiny.zarr"
    preprocess_dataset(
        phantom_dir, store, load_settings(REPO / "configs" / "tiny.toml"), serial_runner
    )
    return store


@pytest.fixture(scope="session")
def tiny_runs_root(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A runs root with one versioned run, champion of every key in registry.json: both
    stages of the three models trained 20 steps on the tiny store (configs/tiny.toml)."""
    from liverpipe.ops import challenge
    from liverpipe.settings import load_settings
    from liverpipe.train import start_run, train_all

    root = tmp_path_factory.mktemp("runs")
    settings = load_settings(
        REPO / "configs" / "tiny.toml", {"train": {"steps": 20}, "tumour": {"steps": 20}}
    )
    run = start_run(root, tiny_store, settings)
    outcomes = train_all(tiny_store, run, settings, gpus=[])
    assert all(o.result is not None for o in outcomes), [o.error for o in outcomes]
    assert all(d.promoted for d in challenge(root, run.name, settings.registry))
    return root


@pytest.fixture(scope="session")
def tiny_runs(tiny_runs_root: Path) -> Path:
    """The run of ``tiny_runs_root``: RUNS/<run_id>/<model>/liver and .../tumour."""
    from liverpipe.rundir import latest_run

    run = latest_run(tiny_runs_root)
    assert run is not None
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def external_cluster(tmp_path: Path):
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    bindir = Path(sys.executable).parent
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    scheduler = subprocess.Popen(
        [
            str(bindir / "dask"),
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-dashboard",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    worker = subprocess.Popen(
        [
            str(bindir / "dask"),
            "worker",
            address,
            "--nthreads",
            "1",
            "--nworkers",
            "2",
            "--no-dashboard",
            "--host",
            "127.0.0.1",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        from distributed import Client

        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for proc in (worker, scheduler):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory):
    """One temporary Prefect server (SQLite) for every flow test of the session."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    results = tmp_path_factory.mktemp("prefect-results")
    with (
        temporary_settings({PREFECT_LOCAL_STORAGE_PATH: results}),
        prefect_test_harness(server_startup_timeout=120),
    ):
        yield


def assign_uids(ds, study: str, series: str) -> None:
    """Fresh, consistent UIDs on one slice of an anonymised series, as a
    de-identification pipeline that keeps them writes it: the real DICOM fixture's were
    blanked, and a PACS (Orthanc) refuses instances without them."""
    import pydicom

    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPClassUID = pydicom.uid.CTImageStorage
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


ORTHANC_PLUGINS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc/plugins"))


@pytest.fixture
def orthanc(tmp_path: Path):
    """A real Orthanc PACS with its DICOMweb plugin, on a free port of 127.0.0.1, with a
    temporary storage folder and config file; stopped afterwards. Yields its DICOMweb
    root URL. Orthanc 1.10 (Debian 12) cannot choose its HTTP bind address: it listens on
    every interface and, with ``RemoteAccessAllowed`` off, refuses every host but this
    one. Newer releases bind to 127.0.0.1 only (``HttpBindAddresses``)."""
    import json
    import shutil
    import time
    import urllib.request

    binary = shutil.which("Orthanc")
    plugin = next(
        (
            d / "libOrthancDicomWeb.so"
            for d in ORTHANC_PLUGINS
            if (d / "libOrthancDicomWeb.so").is_file()
        ),
        None,
    )
    if binary is None or plugin is None:
        pytest.fail(
            "Orthanc and its DICOMweb plugin are needed by the PACS tests: "
            "`apt-get install orthanc orthanc-dicomweb` as root (`make test` does it)"
        )
    port = free_port()
    folder = tmp_path / "orthanc"
    (folder / "db").mkdir(parents=True)
    config = {
        "Name": "liverpipe-test",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "HttpPort": port,
        # Honoured by Orthanc releases since September 2025; 1.10 ignores it and listens
        # on every interface, refusing all hosts but this one (RemoteAccessAllowed).
        "HttpBindAddresses": ["127.0.0.1"],
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = (folder / "orthanc.log").open("wb")
    proc = subprocess.Popen(
        [binary, str(folder / "orthanc.json")], cwd=folder, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"Orthanc exited ({proc.returncode}): {(folder / 'orthanc.log').read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{base}/system", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"Orthanc did not answer in 60 s: {(folder / 'orthanc.log').read_text()[-2000:]}"
                )
            time.sleep(0.2)
        yield f"{base}/dicom-web"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
