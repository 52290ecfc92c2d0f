"""Prefect flows: preprocess on Dask (local and external), ingest, and the served deployments."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, copy_runs, free_port

from liverpipe.errors import LiverpipeError
from storage import SliceStore

pytestmark = pytest.mark.usefixtures("prefect_harness")
TINY = REPO / "configs" / "tiny.toml"


def _copy_case(
    phantom_dir: Path, index: int, inbox: Path, labelled: bool = True, name: str | None = None
) -> str:
    image = sorted((phantom_dir / "imagesTr").iterdir())[index]
    label = phantom_dir / "labelsTr" / image.name
    case_id, _, suffix = image.name.partition(".")
    target = f"{name or case_id}.{suffix}"
    if labelled:
        (inbox / "imagesTr").mkdir(parents=True, exist_ok=True)
        (inbox / "labelsTr").mkdir(parents=True, exist_ok=True)
        shutil.copy(image, inbox / "imagesTr" / target)
        shutil.copy(label, inbox / "labelsTr" / target)
    else:
        (inbox / "imagesTs").mkdir(parents=True, exist_ok=True)
        shutil.copy(image, inbox / "imagesTs" / target)
    return name or case_id


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _tick_imports_torch(params: dict[str, str]) -> bool:
    """Run one ingest tick in a fresh process against this session's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    code = (
        "import json, sys; from flows.ingest import ingest; "
        f"r = ingest(**json.loads({json.dumps(json.dumps(params))})); "
        "assert r['preprocess']['unchanged'] and not r['predict']['predicted'], r; "
        "print('TORCH', 'torch' in sys.modules)"
    )
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (answer,) = [line for line in out.stdout.splitlines() if line.startswith("TORCH ")]
    return answer == "TORCH True"


def test_preprocess_flow_on_an_external_dask_cluster(
    phantom_dir: Path, tmp_path: Path, external_cluster: str
) -> None:
    from prefect.artifacts import Artifact

    from flows.preprocess import preprocess

    store = tmp_path / "s.zarr"
    result = preprocess(str(phantom_dir), str(store), str(TINY), dask_address=external_cluster)
    assert sorted(result["processed"]) == sorted(SliceStore.open(store).cases())
    assert len(result["processed"]) == 4 and result["failed"] == {}
    again = preprocess(str(phantom_dir), str(store), str(TINY), dask_address=external_cluster)
    assert again["processed"] == [] and len(again["skipped"]) == 4
    artifact = Artifact.get("preprocess-cases")
    assert artifact is not None and "skipped" in str(artifact.data)


def test_ingest_processes_only_new_scans_predicts_and_retrains(
    phantom_dir: Path, tiny_runs_root: Path, tmp_path: Path
) -> None:
    from flows.ingest import ingest
    from liverpipe.ops import ENSEMBLE, STATE, Registry
    from liverpipe.rundir import run_folders

    config = tmp_path / "ingest.toml"
    tiny = TINY.read_text().replace("steps = 30", "steps = 2")  # retraining: 2 steps
    config.write_text(tiny + "\n[ingest]\nmin_new_cases = 3\n")
    inbox, runs, outputs = tmp_path / "inbox", tmp_path / "runs", tmp_path / "outputs"
    copy_runs(tiny_runs_root, runs)
    champion = Registry.load(runs).champions[ENSEMBLE]
    first = [_copy_case(phantom_dir, i, inbox) for i in (0, 1)]
    unlabelled = _copy_case(phantom_dir, 3, inbox, labelled=False)
    params = {
        "inbox": str(inbox),
        "store": str(tmp_path / "store.zarr"),
        "runs": str(runs),
        "outputs": str(outputs),
        "config": str(config),
        "report": str(tmp_path / "report"),
    }
    before = _digests(inbox)
    one = ingest(**params)
    assert sorted(one["preprocess"]["processed"]) == sorted(first)
    assert one["trained"] is False and one["predict"]["predicted"] == [unlabelled]
    scan = nib.load(next((inbox / "imagesTs").iterdir()))
    mask = nib.load(outputs / f"{unlabelled}.nii.gz")
    assert mask.shape == scan.shape and np.array_equal(mask.affine, scan.affine)
    measured = json.loads((outputs / f"{unlabelled}.json").read_text())
    assert measured["scan"].endswith(scan.get_filename().rsplit("/", 1)[1])
    assert measured["model_version"]["run_ids"] == [champion]
    ledger = json.loads((outputs / "ledger.json").read_text())
    assert ledger[unlabelled]["model_version"]["run_ids"] == [champion]

    # Nothing new: no preprocessing subflow (no Dask cluster), no prediction.
    idle = ingest(**params)
    assert idle["preprocess"]["unchanged"] is True and idle["predict"]["predicted"] == []
    assert idle["trained"] is False and idle["verified"] is False
    verified = ingest(**params, verify=True)  # every file re-hashed: still nothing to do
    assert verified["verified"] is True and verified["preprocess"]["processed"] == []
    assert _tick_imports_torch(params) is False  # the whole flow, in a fresh process

    new = _copy_case(phantom_dir, 2, inbox)
    before = {**before, **{k: v for k, v in _digests(inbox).items() if k not in before}}
    two = ingest(**params)
    assert two["preprocess"]["processed"] == [new]
    assert sorted(two["preprocess"]["skipped"]) == sorted(first)
    assert two["predict"]["predicted"] == []  # the unlabelled scan was done already
    assert two["trained"] is True  # 3 labelled cases since the last training (none)
    assert sorted(json.loads((runs / STATE).read_text())["trained_on"]) == sorted([*first, new])
    # The retrain is a new run beside the old one; the registry holds the decision.
    assert [p.name for p in run_folders(runs)] == [champion, two["train"]["run_id"]]
    assert Registry.load(runs).history[-1].run_id == two["train"]["run_id"]
    assert (tmp_path / "report" / "report.html").is_file()
    assert _digests(inbox) == before  # inbox files are never rewritten

    # A scan nibabel refuses arrives: it is recorded, the others go on, the run fails
    # naming it, and the same bytes are not retried at the next tick.
    broken = nib.Nifti1Image(np.zeros((20, 20, 20), np.int16), np.eye(4))
    broken.header["scl_slope"], broken.header["scl_inter"] = 1.0, float("nan")
    nib.save(broken, inbox / "imagesTs" / "aa_broken.nii.gz")
    late = _copy_case(phantom_dir, 0, inbox, labelled=False, name="zz_late")
    with pytest.raises(LiverpipeError, match="1 scan\\(s\\) failed in this tick: aa_broken"):
        ingest(**params)
    ledger = json.loads((outputs / "ledger.json").read_text())
    assert "invalid intercept nan" in ledger["aa_broken"]["error"]
    assert (outputs / f"{late}.nii.gz").is_file()
    calm = ingest(**params)  # unchanged broken bytes: recorded once, not retried
    assert calm["predict"]["predicted"] == [] and calm["predict"]["failed"] == {}


def test_served_deployment_runs_from_the_prefect_cli(phantom_dir: Path, tmp_path: Path) -> None:
    """A real local server and serve process; `prefect deployment run` through the CLI."""
    bindir = Path(sys.executable).parent
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {
        "PREFECT_HOME": str(tmp_path / "home"),
        "DO_NOT_TRACK": "1",
    }
    store = tmp_path / "store.zarr"
    serve = subprocess.run(
        [
            str(bindir / "liverpipe"),
            "serve",
            "--detach",
            "--port",
            str(port),
            "--config",
            str(TINY),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    try:
        assert serve.returncode == 0, serve.stdout + serve.stderr
        assert f"http://127.0.0.1:{port}" in serve.stdout
        run = subprocess.run(
            [
                str(bindir / "prefect"),
                "deployment",
                "run",
                "preprocess/preprocess",
                "-p",
                f"data_dir={phantom_dir}",
                "-p",
                f"store={store}",
                "--watch",
                "--watch-timeout",
                "400",
            ],
            env=env | {"PREFECT_API_URL": f"http://127.0.0.1:{port}/api"},
            capture_output=True,
            text=True,
            timeout=450,
            check=False,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "Completed" in run.stdout
        assert len(SliceStore.open(store).cases()) == 4
    finally:
        down = subprocess.run(
            [str(bindir / "liverpipe"), "down"],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert "stopped 2 process(es)" in down.stdout
    assert not (tmp_path / "home" / "liverpipe-serve.json").exists()


def test_deployments_are_named_after_their_flows_and_ingest_is_scheduled(tmp_path: Path) -> None:
    from flows.serve import deployments

    config = tmp_path / "c.toml"
    config.write_text('[ingest]\ncron = "*/5 * * * *"\n')
    built = {f"{d.flow_name}/{d.name}": d for d in deployments(config, {"store": "/s.zarr"})}
    assert set(built) == {
        "preprocess/preprocess",
        "train-all/train-all",
        "evaluate/evaluate",
        "predict/predict",
        "ingest/ingest",
    }
    ingest = built["ingest/ingest"]
    assert [s.schedule.cron for s in ingest.schedules] == ["*/5 * * * *"]
    assert ingest.concurrency_limit == 1
    assert ingest.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert built["preprocess/preprocess"].parameters == {"store": "/s.zarr", "config": str(config)}
    assert all(not d.schedules for name, d in built.items() if name != "ingest/ingest")
