"""The scheduled ingest tick over a large inbox: a no-op tick, then a tick with new scans.

The inbox holds ``--scans`` files (half labelled in imagesTr/labelsTr, half unlabelled in
imagesTs), hard links to 3 rendered phantoms. The state a long-running deployment would
have reached is seeded, not recomputed (preprocessing 10,000 scans is not the point
here): each labelled link gets a manifest entry cloned from its phantom's real entry
(with the link's own file identity), each unlabelled link a ledger record, and the
ingest state lists every labelled case as trained on. The seeded entries point at no
stored arrays; a tick never reads them.

Then it runs the real ``ingest`` flow (Prefect test server) and reports:
  * the no-op tick (median of 3 flow runs) and, outside Prefect, where its time goes;
  * a tick with ``--new`` new labelled scans (preprocessed on a Dask LocalCluster);
  * whether the no-op tick imported torch or started a Dask cluster.

Usage: python bench/ingest.py [--scans 10000] [--new 5] [--json bench/out/ingest.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from liverpipe._system import available_cpus  # noqa: E402
from liverpipe.io import case_identity, file_sha256  # noqa: E402
from liverpipe.ops import Ledger, TickState, inbox_cases, to_predict, unlabelled_scans  # noqa: E402
from liverpipe.preprocess import needs_workers, pending, preprocess_dataset, serial_runner  # noqa: E402
from liverpipe.settings import load_settings  # noqa: E402
from liverpipe.synth import generate_dataset  # noqa: E402
from storage import SliceStore  # noqa: E402

PHANTOMS = 3


def _config(root: Path) -> Path:
    """configs/tiny.toml, never retraining during the benchmark."""
    path = root / "bench.toml"
    path.write_text(
        (REPO / "configs" / "tiny.toml").read_text() + "\n[ingest]\nmin_new_cases = 1000000\n"
    )
    return path


def _suffix(path: Path) -> str:
    return path.name[path.name.index(".") :]


def build(root: Path, scans: int) -> dict[str, Path]:
    """Phantoms, their store, the hard-linked inbox and the seeded state."""
    config = _config(root)
    settings = load_settings(config)
    pairs = generate_dataset(root / "phantoms", PHANTOMS, seed=0, size="small", workers=1)
    store = root / "store.zarr"
    preprocess_dataset(root / "phantoms", store, settings, serial_runner)
    opened = SliceStore.open(store)
    templates = [opened.manifest.entries[img.name.split(".")[0]] for img, _ in pairs]
    inbox = root / "inbox"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (inbox / sub).mkdir(parents=True)
    labelled = scans // 2
    # Every link first: a new link changes the ctime its inode shares with the others,
    # so identities are taken once all links exist (as a deployment's first tick would).
    for i in range(labelled):
        image, label = pairs[i % PHANTOMS]
        name = f"arch_{i:05d}{_suffix(image)}"
        os.link(image, inbox / "imagesTr" / name)
        os.link(label, inbox / "labelsTr" / name)
    for i in range(scans - labelled):
        image = pairs[i % PHANTOMS][0]
        os.link(image, inbox / "imagesTs" / f"unl_{i:05d}{_suffix(image)}")
    for i in range(labelled):
        name = f"arch_{i:05d}{_suffix(pairs[i % PHANTOMS][0])}"
        opened.manifest.upsert(
            replace(
                templates[i % PHANTOMS],
                case_id=f"arch_{i:05d}",
                image=str(inbox / "imagesTr" / name),
                label=str(inbox / "labelsTr" / name),
                identity=case_identity(inbox / "imagesTr" / name, inbox / "labelsTr" / name),
            )
        )
    opened.manifest.save()
    ledger = Ledger()
    digests = [file_sha256(img) for img, _ in pairs]
    for i in range(scans - labelled):
        link = inbox / "imagesTs" / f"unl_{i:05d}{_suffix(pairs[i % PHANTOMS][0])}"
        ledger.entries[f"unl_{i:05d}"] = {
            "sha256": digests[i % PHANTOMS],
            "identity": case_identity(link, None)["image"],
            "mask": str(root / "outputs" / f"unl_{i:05d}.nii.gz"),  # never read
            "model_version": {"run_ids": ["seeded"], "models": ["seeded/manet"]},
        }
    ledger.save(root / "outputs")
    TickState(0, tuple(opened.cases())).save(root / "runs")
    return {
        "inbox": inbox,
        "store": store,
        "config": config,
        "runs": root / "runs",
        "outputs": root / "outputs",
    }


def phases(paths: dict[str, Path]) -> dict[str, float]:
    """The no-op tick's steps outside Prefect, in the flow's order (seconds)."""
    settings = load_settings(paths["config"])
    out: dict[str, float] = {}
    start = time.perf_counter()
    work = pending(paths["inbox"], paths["store"], settings)
    out["preprocess plan (discover, stat, manifest)"] = time.perf_counter() - start
    start = time.perf_counter()
    entries = SliceStore.open(paths["store"]).manifest.entries
    assert not needs_workers(work, entries), "the seeded inbox should need no preprocessing"
    out["needs-workers check (manifest read)"] = time.perf_counter() - start
    start = time.perf_counter()
    inbox_cases(SliceStore.open(paths["store"]), paths["inbox"])
    TickState.load(paths["runs"])
    out["new-since-training (store cases, state)"] = time.perf_counter() - start
    start = time.perf_counter()
    ledger = Ledger.load(paths["outputs"])
    todo, _ = to_predict(unlabelled_scans(paths["inbox"]), ledger, None)
    assert todo == []
    out["prediction ledger (load, stat)"] = time.perf_counter() - start
    return {k: round(v, 3) for k, v in out.items()}


def _flow_tick(paths: dict[str, Path]) -> tuple[float, dict[str, object]]:
    from flows.ingest import ingest

    start = time.perf_counter()
    result = ingest(
        inbox=str(paths["inbox"]),
        store=str(paths["store"]),
        runs=str(paths["runs"]),
        outputs=str(paths["outputs"]),
        config=str(paths["config"]),
        report=str(paths["runs"].parent / "report"),
    )
    return time.perf_counter() - start, result


def _torch_free(paths: dict[str, Path]) -> bool:
    """Run the no-op tick's library steps in a fresh process: is torch imported?"""
    code = (
        "import sys, bench.ingest as b; from pathlib import Path; "
        f"b.phases({{k: Path(v) for k, v in {json.dumps({k: str(v) for k, v in paths.items()})}.items()}}); "
        "import flows.ingest; print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    return out.stdout.strip().endswith("False")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", type=int, default=10_000)
    parser.add_argument("--new", type=int, default=5)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "ingest.json")
    args = parser.parse_args()
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    root = Path(tempfile.mkdtemp(prefix="liverpipe-ingest-"))
    record: dict[str, object] = {
        "machine": f"{platform.machine()}, {available_cpus()} cores, Python {platform.python_version()}",
        "scans": args.scans,
    }
    try:
        start = time.perf_counter()
        paths = build(root, args.scans)
        record["build_s"] = round(time.perf_counter() - start, 1)
        record["no_op_phases_s"] = phases(paths)
        record["no_op_phases_total_s"] = round(sum(record["no_op_phases_s"].values()), 3)  # type: ignore[attr-defined]
        record["no_op_imports_torch"] = not _torch_free(paths)
        with prefect_test_harness(server_startup_timeout=120):
            _flow_tick(paths)  # first flow run: Prefect's own start-up, not counted
            ticks = [_flow_tick(paths) for _ in range(3)]
            record["no_op_tick_s"] = [round(t, 2) for t, _ in ticks]
            record["no_op_tick_median_s"] = round(statistics.median(t for t, _ in ticks), 2)
            record["no_op_preprocess"] = ticks[-1][1]["preprocess"] and {
                k: v
                for k, v in ticks[-1][1]["preprocess"].items()
                if k != "skipped"  # type: ignore[union-attr]
            }
            phantoms = sorted((root / "phantoms" / "imagesTr").iterdir())
            for i in range(args.new):
                name = f"new_{i:03d}{_suffix(phantoms[i % PHANTOMS])}"
                shutil.copy(phantoms[i % PHANTOMS], paths["inbox"] / "imagesTr" / name)
                shutil.copy(
                    root / "phantoms" / "labelsTr" / phantoms[i % PHANTOMS].name,
                    paths["inbox"] / "labelsTr" / name,
                )
            seconds, result = _flow_tick(paths)
            processed = result["preprocess"]["processed"]  # type: ignore[index]
            record["new_tick_s"] = round(seconds, 2)
            record["new_tick_processed"] = len(processed)
            # The preprocess subflow's own clock (cluster start-up not included).
            record["new_tick_preprocess_s"] = result["preprocess"]["seconds"]  # type: ignore[index]
            seconds, _ = _flow_tick(paths)
            record["after_new_no_op_tick_s"] = round(seconds, 2)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
