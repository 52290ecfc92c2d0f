"""Issue 12: change detection by file identity, versioned runs, champion and challenger,
traceable predictions, and nothing lost to a kill -9."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, copy_runs
from typer.testing import CliRunner

from liverpipe.cli import app
from liverpipe.errors import LiverpipeError
from liverpipe.io import FileIdentity
from liverpipe.models import save_checkpoint
from liverpipe.ops import ENSEMBLE, Ledger, Registry, challenge, rollback, to_predict
from liverpipe.preprocess import preprocess_dataset, serial_runner
from liverpipe.rundir import RunRecord, new_run_id, resolve_run, run_folders
from liverpipe.settings import RegistryConfig, load_settings
from storage import SliceStore

TINY = REPO / "configs" / "tiny.toml"
RULE = RegistryConfig()


# -- change detection -------------------------------------------------------------------


def _inbox(phantom_dir: Path, root: Path, cases: int = 3) -> Path:
    """A copy of the first ``cases`` session phantoms (never modify the session's)."""
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
        for path in sorted((phantom_dir / sub).iterdir())[:cases]:
            shutil.copy(path, root / sub / path.name)
    return root


def _rewrite_same_size_same_mtime(path: Path) -> None:
    """Change one byte in place, then put the mtime back: size, mtime and inode stay."""
    before = os.stat(path)
    with path.open("r+b") as fh:
        fh.seek(before.st_size // 2)
        byte = fh.read(1)
        fh.seek(before.st_size // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )


def test_preprocess_reads_only_files_whose_identity_changed(
    phantom_dir: Path, tmp_path: Path
) -> None:
    data = _inbox(phantom_dir, tmp_path / "data")
    store = tmp_path / "s.zarr"
    settings = load_settings(TINY)
    first = preprocess_dataset(data, store, settings, serial_runner)
    assert len(first.processed) == 3
    entries = SliceStore.open(store).manifest.entries
    image = next((data / "imagesTr").iterdir())
    case_id = image.name.split(".")[0]
    assert entries[case_id].identity == {
        "image": FileIdentity.of(image).to_list(),
        "label": FileIdentity.of(data / "labelsTr" / image.name).to_list(),
    }

    # Touched (new mtime, same bytes): re-hashed, identity refreshed, not reprocessed.
    os.utime(image, ns=(time.time_ns(), time.time_ns() + 10**9))
    touched = preprocess_dataset(data, store, settings, serial_runner)
    assert touched.processed == [] and touched.rehashed == [case_id]
    assert sorted(touched.skipped) == sorted(first.processed)
    refreshed = SliceStore.open(store).manifest.entries[case_id].identity
    assert refreshed is not None and refreshed["image"] == FileIdentity.of(image).to_list()
    calm = preprocess_dataset(data, store, settings, serial_runner)
    assert calm.processed == [] and calm.rehashed == []

    # Same size, same mtime, same inode, new bytes. With trust_ctime (the default) the
    # ctime still gives the rewrite away; without it only --verify finds it.
    old_hash = SliceStore.open(store).manifest.entries[case_id].source_sha256
    _rewrite_same_size_same_mtime(image)
    blind = load_settings(TINY, {"ingest": {"trust_ctime": False}})
    assert preprocess_dataset(data, store, blind, serial_runner).processed == []
    config = tmp_path / "blind.toml"
    config.write_text(TINY.read_text() + "\n[ingest]\ntrust_ctime = false\n")
    args = ["preprocess", str(data), "--store", str(store), "--config", str(config), "--json"]
    quiet = json.loads(CliRunner().invoke(app, [*args, "--workers", "1"]).stdout)
    assert quiet["processed"] == [] and case_id not in quiet["failed"]
    verified = CliRunner().invoke(app, [*args, "--workers", "1", "--verify"])
    summary = json.loads(verified.stdout)
    assert case_id in summary["processed"] or case_id in summary["failed"]
    assert SliceStore.open(store).manifest.entries[case_id].source_sha256 != old_hash


def test_an_in_place_rewrite_is_caught_by_its_ctime(phantom_dir: Path, tmp_path: Path) -> None:
    data = _inbox(phantom_dir, tmp_path / "data", cases=3)
    store = tmp_path / "s.zarr"
    settings = load_settings(TINY)
    preprocess_dataset(data, store, settings, serial_runner)
    label = sorted((data / "labelsTr").iterdir())[0]
    time.sleep(0.01)  # ctime has nanoseconds here, but be safe on coarse file systems
    _rewrite_same_size_same_mtime(label)
    again = preprocess_dataset(data, store, settings, serial_runner)
    case_id = label.name.split(".")[0]
    assert case_id in again.processed or case_id in again.failed


def test_the_ledger_trusts_identity_and_verify_reads_everything(tmp_path: Path) -> None:
    scans = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.nii"
        path.write_bytes(bytes(range(256)) * 40)
        scans.append(path)
    ledger = Ledger()
    todo, touched = to_predict(scans, ledger, "r1")
    assert [p.reason for p in todo] == ["new", "new"] and touched == []
    for item in todo:  # as predict_pending records a prediction
        ledger.entries[item.case_id] = {
            "sha256": item.sha256,
            "identity": item.identity,
            "mask": f"{item.case_id}.nii.gz",
            "model_version": {"run_ids": ["r1"], "models": ["r1/manet"]},
        }
    assert to_predict(scans, ledger, "r1") == ([], [])
    os.utime(scans[0], ns=(time.time_ns(), time.time_ns() + 10**9))
    todo, touched = to_predict(scans, ledger, "r1")
    assert todo == [] and touched == ["a"]
    _rewrite_same_size_same_mtime(scans[1])
    assert to_predict(scans, ledger, "r1", trust_ctime=False) == ([], [])
    todo, _ = to_predict(scans, ledger, "r1", verify=True, trust_ctime=False)
    assert [(p.case_id, p.reason) for p in todo] == [("b", "changed")]
    # A new champion re-predicts only with repredict_on_promotion.
    assert to_predict(scans[:1], ledger, "r2")[0] == []
    todo, _ = to_predict(scans[:1], ledger, "r2", repredict=True)
    assert [(p.case_id, p.reason) for p in todo] == [("a", "new champion")]


# -- versioned runs, champion and challenger ---------------------------------------------


def _copy_run(source: Path, root: Path, label: str) -> str:
    """A new versioned run in ``root`` whose models are ``source``'s (its own run id)."""
    record = RunRecord.read(source)
    run_id = new_run_id({"copy": label}, record.cases)
    copy_runs(source, root / run_id)
    data = {**record.to_dict(), "run_id": run_id}
    (root / run_id / "run.json").write_text(json.dumps(data))
    return run_id


def _blind(run: Path) -> None:
    """Make every model of ``run`` predict background everywhere (a broken retrain)."""
    for checkpoint in run.glob("*/*/*.pt"):
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        bias = [
            k for k in state["model"] if k.startswith("segmentation_head") and k.endswith("bias")
        ]
        assert bias, sorted(state["model"])[-5:]
        state["model"][bias[-1]][:] = torch.tensor([1e4, -1e4, -1e4])
        save_checkpoint(checkpoint, state)  # a rename: a hard-linked source stays intact


@pytest.fixture
def runs_root(tiny_runs_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    return copy_runs(tiny_runs_root, root)


def test_train_all_run_is_versioned_and_records_its_cases(
    tiny_runs_root: Path, tiny_store: Path
) -> None:
    (run,) = run_folders(tiny_runs_root)
    record = RunRecord.read(run)
    store = SliceStore.open(tiny_store)
    assert record.run_id == run.name and record.store_config_hash == store.meta.config_hash
    assert {s: record.cases[s] for s in ("train", "val", "test")} == {
        s: store.cases(s) for s in ("train", "val", "test")
    }
    assert record.cases["test"] and not set(record.cases["test"]) & record.seen
    registry = json.loads((tiny_runs_root / "registry.json").read_text())  # plain JSON
    assert registry["champions"] == {k: run.name for k in [*record.models, ENSEMBLE]}
    assert resolve_run(tiny_runs_root) == run


def test_a_worse_challenger_is_rejected_a_better_one_promoted_and_rollback_restores(
    runs_root: Path,
) -> None:
    trained = Registry.load(runs_root).champions[ENSEMBLE]
    blind = _copy_run(runs_root / trained, runs_root, "blind")
    _blind(runs_root / blind)

    worse = challenge(runs_root, blind, RULE, keys=["manet", ENSEMBLE])
    assert [d.promoted for d in worse] == [False, False]
    assert worse[0].scores["champion"]["liver_dice"] > RULE.liver_dice_tolerance
    assert worse[0].scores["challenger"]["liver_dice"] == 0.0
    assert worse[0].cases == RunRecord.read(runs_root / trained).cases["test"]
    registry = Registry.load(runs_root)
    assert registry.champions[ENSEMBLE] == trained
    assert [d.action for d in registry.history[-2:]] == ["reject", "reject"]

    # Forced: promoted, and the history says so.
    forced = challenge(runs_root, blind, RULE, keys=[ENSEMBLE], force=True)
    assert forced[0].promoted and forced[0].forced and forced[0].reason.startswith("forced")
    assert Registry.load(runs_root).champions[ENSEMBLE] == blind

    # A better run (the trained models again, as a new run) replaces the blind champion.
    better = _copy_run(runs_root / trained, runs_root, "better")
    (decision,) = challenge(runs_root, better, RULE, keys=[ENSEMBLE])
    assert decision.promoted and not decision.forced and decision.previous == blind
    assert decision.scores["challenger"]["liver_dice"] > decision.scores["champion"]["liver_dice"]
    assert Registry.load(runs_root).champions[ENSEMBLE] == better

    # Rollback applies the same check: back to the (worse) blind run only with --force.
    with pytest.raises(LiverpipeError, match="no previous champion"):
        rollback(runs_root, RULE, keys=["manet"])
    (refused,) = rollback(runs_root, RULE, keys=[ENSEMBLE])
    assert not refused.promoted and Registry.load(runs_root).champions[ENSEMBLE] == better
    (back,) = rollback(runs_root, RULE, keys=[ENSEMBLE], force=True)
    assert back.action == "rollback" and back.forced
    assert Registry.load(runs_root).champions[ENSEMBLE] == blind


def test_models_cli_lists_and_predict_names_the_champion(
    runs_root: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    champion = Registry.load(runs_root).champions[ENSEMBLE]
    listed = CliRunner().invoke(app, ["models", "list", "--runs", str(runs_root)])
    assert listed.exit_code == 0, listed.output
    assert champion in listed.output and "ensemble" in listed.output
    record = json.loads(
        CliRunner().invoke(app, ["models", "list", "--runs", str(runs_root), "--json"]).output
    )
    assert record["runs"] == [champion] and record["champions"][ENSEMBLE] == champion
    assert record["history"][0]["reason"] == "the first run: no champion yet"
    scan = sorted((phantom_dir / "imagesTr").iterdir())[0]
    out = tmp_path / "mask.nii.gz"
    result = CliRunner().invoke(
        app, ["predict", str(scan), "-o", str(out), "--runs", str(runs_root)]
    )
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "mask.json").read_text())
    assert record["model_version"]["run_ids"] == [champion]
    assert sorted(record["model_version"]["models"]) == sorted(
        f"{champion}/{m}" for m in ("deeplabv3plus", "manet", "unetplusplus")
    )
    again = CliRunner().invoke(app, ["models", "promote", champion, "--runs", str(runs_root)])
    assert again.exit_code == 0, again.output
    assert all(d.reason == "already the champion" for d in Registry.load(runs_root).history[-4:])


# -- nothing lost to kill -9 -------------------------------------------------------------

_WRITER = """
import sys
from pathlib import Path
from liverpipe.ops.inbox import Ledger
from liverpipe.ops.registry import Registry
root, kind = Path(sys.argv[1]), sys.argv[2]
big = {f"case_{i:05d}": {"sha256": "x" * 64, "identity": [i, i, i, i]} for i in range(3000)}
print("ready", flush=True)
i = 0
while True:
    i += 1
    if kind == "ledger":
        Ledger({**big, "tick": {"n": i}}).save(root)
    else:
        Registry({"ensemble": f"run-{i}"}).save(root)
"""


@pytest.mark.parametrize("kind", ["ledger", "registry"])
def test_kill_9_during_a_write_leaves_a_whole_file(kind: str, tmp_path: Path) -> None:
    rng = random.Random(12)
    for _ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_path), kind],
            stdout=subprocess.PIPE,
            cwd=REPO,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.05, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if kind == "ledger":
            entries = Ledger.load(tmp_path).entries
            assert len(entries) == 3001 and entries["tick"]["n"] >= 1
        else:
            assert Registry.load(tmp_path).champions["ensemble"].startswith("run-")


def test_kill_9_mid_promotion_keeps_the_previous_registry(runs_root: Path) -> None:
    champion = Registry.load(runs_root).champions[ENSEMBLE]
    challenger = _copy_run(runs_root / champion, runs_root, "killed")
    before = (runs_root / "registry.json").read_bytes()
    cmd = [
        sys.executable,
        "-m",
        "liverpipe.cli",
        "models",
        "promote",
        challenger,
        "--runs",
        str(runs_root),
        "--force",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    rng = random.Random(3)
    for _ in range(4):
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 6.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        after = Registry.load(runs_root)  # always whole
        if (runs_root / "registry.json").read_bytes() != before:
            # The write happened: every key moved at once. Start again from before.
            assert set(after.champions.values()) == {challenger}
            (runs_root / "registry.json").write_bytes(before)
    finished = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, check=False)
    assert finished.returncode == 0, finished.stderr
    assert set(Registry.load(runs_root).champions.values()) == {challenger}


def test_run_ids_sort_by_time_and_name_their_content() -> None:
    from datetime import UTC, datetime

    early = new_run_id({"a": 1}, {"train": ["x"]}, datetime(2026, 1, 1, tzinfo=UTC))
    late = new_run_id({"a": 1}, {"train": ["x"]}, datetime(2026, 1, 2, tzinfo=UTC))
    other = new_run_id({"a": 2}, {"train": ["x"]}, datetime(2026, 1, 1, tzinfo=UTC))
    assert early < late and early.split("-")[1] == late.split("-")[1] != other.split("-")[1]
    assert all(len(r.split("-")[1]) == 8 for r in (early, late, other))


def test_repredict_on_promotion_keeps_both_versions(
    runs_root: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    from liverpipe.ops import champion, predict_pending

    inbox = tmp_path / "inbox" / "imagesTs"
    inbox.mkdir(parents=True)
    source = sorted((phantom_dir / "imagesTr").iterdir())[1]
    scan = inbox / f"late{source.name[source.name.index('.') :]}"
    shutil.copy(source, scan)
    outputs, ledger = tmp_path / "outputs", Ledger()
    first = champion(runs_root)
    todo, _ = to_predict([scan], ledger, first, repredict=True)
    assert predict_pending(todo, ledger, runs_root, outputs, tta=False) == (["late"], {})
    assert ledger.entries["late"]["model_version"]["run_ids"] == [first]

    second = _copy_run(runs_root / str(first), runs_root, "second")
    challenge(runs_root, second, RULE, keys=[ENSEMBLE], force=True)
    assert to_predict([scan], ledger, champion(runs_root))[0] == []  # the setting is off
    todo, _ = to_predict([scan], ledger, champion(runs_root), repredict=True)
    assert [p.reason for p in todo] == ["new champion"]
    predict_pending(todo, ledger, runs_root, outputs, tta=False)
    entry = Ledger.load(outputs).entries["late"]
    assert entry["model_version"]["run_ids"] == [second]
    (old,) = entry["versions"]
    assert old["model_version"]["run_ids"] == [first]
    kept = Path(old["mask"])
    assert kept.is_file() and kept.parent == outputs / "versions" / str(first)
    assert json.loads(kept.with_name("late.json").read_text())["model_version"]["run_ids"] == [
        first
    ]
    current = json.loads((outputs / "late.json").read_text())
    assert current["model_version"]["run_ids"] == [second]


def test_a_missing_runs_folder_is_named_as_such(tmp_path: Path) -> None:
    """A mistyped --runs is 'no runs folder here', not 'no champion' in a registry that
    does not exist."""
    from liverpipe.errors import LiverpipeError
    from liverpipe.ops import champion_models

    with pytest.raises(LiverpipeError, match="there is no runs folder here") as err:
        champion_models(tmp_path / "runz")
    assert str(tmp_path / "runz") in str(err.value) and "Fix:" in str(err.value)
    from typer.testing import CliRunner

    from liverpipe.cli import app

    for args in (["list"], ["rollback"], ["promote", "some-run"]):
        result = CliRunner().invoke(app, ["models", *args, "--runs", str(tmp_path / "runz")])
        assert isinstance(result.exception, LiverpipeError), args
        assert "there is no runs folder here" in str(result.exception)


def test_a_broken_link_in_the_inbox_fails_once_and_the_other_scans_go_on(
    phantom_dir: Path, tiny_runs_root: Path, tmp_path: Path
) -> None:
    """A dangling symbolic link in INBOX/imagesTs stopped every ingest tick (stat raised).
    Now it is one failed case, named, recorded and not retried; once its target exists
    it is predicted."""
    from liverpipe.ops import champion, predict_pending, unlabelled_scans

    runs, out, inbox = tmp_path / "runs", tmp_path / "outputs", tmp_path / "inbox"
    copy_runs(tiny_runs_root, runs)
    (inbox / "imagesTs").mkdir(parents=True)
    scan = sorted((phantom_dir / "imagesTr").iterdir())[0]
    suffix = ".nii.gz" if scan.name.endswith(".gz") else ".nii"
    shutil.copy(scan, inbox / "imagesTs" / f"good{suffix}")
    target = tmp_path / "mount" / f"late{suffix}"
    (inbox / "imagesTs" / f"late{suffix}").symlink_to(target)
    best = champion(runs)
    scans = unlabelled_scans(inbox)
    todo, _ = to_predict(scans, Ledger(), best)
    assert sorted(p.case_id for p in todo) == ["good", "late"]
    predicted, failed = predict_pending(todo, Ledger(), runs, out, tta=False)
    assert predicted == ["good"], failed
    assert "a symbolic link to" in failed["late"] and "which does not exist" in failed["late"]
    assert to_predict(scans, Ledger.load(out), best) == ([], [])  # not retried
    target.parent.mkdir()
    shutil.copy(scan, target)
    todo, _ = to_predict(scans, Ledger.load(out), best)
    assert [(p.case_id, p.reason) for p in todo] == [("late", "changed")]
