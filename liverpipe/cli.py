"""The ``liverpipe`` command line (Typer). Each command is a thin shell over the library."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from liverpipe._console import err_console, say, table_console
from liverpipe._files import file_in_the_way
from liverpipe.cli_models import models_app
from liverpipe.errors import FixableError, LiverpipeError
from liverpipe.settings import TUMOUR_SEED, TUMOUR_THRESHOLD, Settings, load_settings

__all__ = ["ConfigOpt", "app", "main"]

app = typer.Typer(
    name="liverpipe",
    help="Liver and liver-tumour segmentation of 3D CT: phantoms, checks, preprocessing, training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(models_app, name="models")

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML file with \\[check], \\[synth], ... sections."),
]


def _settings(config: Path | None, **overrides: dict[str, Any]) -> Settings:
    return load_settings(config, overrides)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )


def _folder(path: Path, option: str) -> Path:
    """``path`` as an output folder: refused, naming the file in the way, when it is or
    lies below an existing file (before any work is done)."""
    existing = file_in_the_way(path)
    if existing is not None:
        raise LiverpipeError(
            existing,
            f"this is a file, so {path} cannot be the {option} folder",
            f"pass a folder path for {option} (it is created when missing)",
        )
    return path


@app.command()
def synth(
    out_dir: Annotated[
        Path, typer.Argument(help="Folder to create (imagesTr/, labelsTr/, dataset.json).")
    ],
    cases: Annotated[int, typer.Option("--cases", "-n", min=1, help="Number of cases.")] = 8,
    seed: Annotated[
        int | None, typer.Option(help="Random seed; the same seed gives the same bytes.")
    ] = None,
    size: Annotated[
        str | None, typer.Option(help="small (96x96 in-plane, for tests) or full (512x512).")
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Processes rendering cases in parallel.")] = 1,
    preview: Annotated[
        bool, typer.Option("--preview", help="Also write OUT_DIR/preview.png.")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Generate realistic abdominal CT phantoms with liver and tumour labels.

    Example: liverpipe synth data/phantoms --cases 8 --seed 1 --size full --preview
    """
    from liverpipe.synth import generate_dataset

    settings = _settings(config, synth={"seed": seed, "size": size})
    _folder(out_dir, "OUT_DIR")
    with _progress() as bar:
        task = bar.add_task("rendering", total=cases)
        pairs = generate_dataset(
            out_dir,
            cases,
            seed=settings.synth.seed,
            size=settings.synth.size,
            workers=workers,
            on_case=lambda _: bar.advance(task),
        )
    typer.echo(
        f"wrote {len(pairs)} cases to {out_dir} (seed {settings.synth.seed}, size {settings.synth.size})"
    )
    if preview:
        typer.echo(
            f"preview: {_write_preview(out_dir, [p for p, _ in pairs[:8]], [lab for _, lab in pairs[:8]])}"
        )


def _write_preview(out_dir: Path, images: list[Path], labels: list[Path]) -> Path:
    from liverpipe.geometry import CanonicalGeometry
    from liverpipe.io import case_id_of, read_header, read_voxels
    from liverpipe.preprocess import canonical_view
    from liverpipe.preview import PreviewCase, write_montage

    shown = []
    for image_path, label_path in zip(images, labels, strict=True):
        image, label = read_header(image_path), read_header(label_path)
        hu = read_voxels(image)
        geometry = CanonicalGeometry.of(hu.shape, image.affine)
        lab = canonical_view(read_voxels(label), CanonicalGeometry.of(label.shape, label.affine))
        # Views, not copies: the montage reads two slices of each volume.
        shown.append(
            PreviewCase(case_id_of(image_path), canonical_view(hu, geometry), lab, geometry.spacing)
        )
    return write_montage(shown, out_dir / "preview.png")


@app.command()
def check(
    data_dir: Annotated[
        Path,
        typer.Argument(help="Dataset root (imagesTr/, labelsTr/), a folder of scans, or one scan."),
    ],
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print a JSON list of {case_id, ok, errors, warnings, fov}."),
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Validate every case as preprocessing would: headers, data, labels, thickness and
    the stored crop's field of view. A folder of DICOM slices is checked series by series.
    Exit 1 if any case is bad.

    Example: liverpipe check /data/Task03_Liver --json
    """
    from liverpipe.io import discover_scans, holds_dicom, is_nifti
    from liverpipe.preprocess import check_dataset, check_series

    settings = _settings(config)
    dicom = (
        data_dir.is_dir()
        and not (data_dir / "imagesTr").is_dir()
        and not any(is_nifti(p) for p in data_dir.iterdir())
        and holds_dicom(data_dir)
    )
    if dicom:  # a folder of DICOM series: each series is one case
        reports = check_series(data_dir, settings.check, settings.preprocess)
    else:
        index = discover_scans(data_dir)
        reports = []
        with _progress() as bar:
            task = bar.add_task("checking", total=len(index.cases))
            for report in check_dataset(index, settings.check, settings.preprocess):
                reports.append(report)
                bar.advance(task)
    if as_json:
        typer.echo(json.dumps([r.to_json() for r in reports], indent=2))
    else:
        _print_check_table(reports)
    raise typer.Exit(0 if reports and all(r.ok for r in reports) else 1)


def _print_check_table(reports: list[Any]) -> None:
    table = Table(title="liverpipe check")
    for column in ("case", "ok", "shape", "spacing (mm)", "orientation", "problem / warning"):
        table.add_column(column)
    for r in reports:
        spacing = "x".join(f"{s:.2f}" for s in r.spacing) if r.spacing else "-"
        shape = "x".join(str(s) for s in r.shape) if r.shape else "-"
        table.add_row(
            r.case_id,
            ("yes" if r.ok else "NO") + (" (!)" if r.warnings else ""),
            shape,
            spacing,
            r.axcodes or "-",
            "\n".join([*r.errors, *(f"warning: {w}" for w in r.warnings)]),
        )
    table_console().print(table)
    bad = sum(not r.ok for r in reports)
    typer.echo(
        f"{len(reports) - bad} of {len(reports)} cases valid" if reports else "no cases found"
    )


@app.command()
def preprocess(
    data_dir: Annotated[Path, typer.Argument(help="Dataset root holding imagesTr/ and labelsTr/.")],
    store: Annotated[
        Path, typer.Option("--store", "-s", help="Slice store path (created if missing).")
    ],
    workers: Annotated[
        int | None, typer.Option(min=0, help="Dask workers; 0 = one per core.")
    ] = None,
    dask_address: Annotated[
        str | None, typer.Option(help="tcp://host:port of an existing Dask scheduler.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run summary as JSON.")] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Re-hash every file instead of trusting unchanged file identities "
            "(size, mtime, inode, ctime).",
        ),
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Preprocess new or changed cases into the Zarr slice store, in parallel with Dask.

    Unchanged cases (same content and config) are skipped: a file whose identity (size,
    mtime, inode, ctime) is unchanged is not even read; --verify re-hashes them all. A
    config change reprocesses every case. Exit 0 when every case is ok, 1 when some failed (valid
    cases are stored either way; failures are in the manifest with their reasons).

    Example: liverpipe preprocess /data/Task03_Liver --store stores/liver.zarr --config configs/tiny.toml
    """
    from liverpipe.preprocess import Plan, dask_map, preprocess_dataset

    settings = _settings(config, store={"workers": workers, "dask_address": dask_address})
    _folder(store, "--store")

    def runner(fn: Any, items: Any, keys: Any) -> Any:
        return dask_map(fn, items, keys, settings.store.workers, settings.store.dask_address)

    with _progress() as bar:
        task = bar.add_task("preprocessing", total=None)

        def on_plan(work: Plan) -> None:
            bar.update(task, total=len(work.todo))

        summary = preprocess_dataset(
            data_dir,
            store,
            settings,
            runner,
            on_result=lambda _cid, _ok: bar.advance(task),
            on_plan=on_plan,
            verify=verify,
        )
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
    else:
        _print_summary(summary)
    raise typer.Exit(0 if summary.ok else 1)


def _print_summary(summary: Any) -> None:
    typer.echo(
        f"processed {len(summary.processed)}, skipped {len(summary.skipped)}, "
        f"failed {len(summary.failed)} in {summary.seconds:.1f} s "
        f"({summary.cases_per_minute:.1f} cases/min)"
    )
    for case_id, error in summary.failed.items():
        say("failed", "red", f"{case_id}: {error}")
    for case_id, error in summary.still_failed.items():
        say("still failing", "red", f"(files unchanged, not retried) {case_id}: {error}")
    for case_id, warnings in summary.warnings.items():
        for warning in warnings:
            say("warning", "yellow", f"{case_id}: {warning}")
    if summary.missing:
        typer.echo(f"sources missing (kept in the store): {', '.join(summary.missing)}")
    if summary.unlabelled:
        typer.echo(f"unlabelled scans not stored (use predict): {len(summary.unlabelled)}")


store_app = typer.Typer(help="Inspect a slice store.", no_args_is_help=True)
app.add_typer(store_app, name="store")


@store_app.command("info")
def store_info(
    store: Annotated[Path, typer.Argument(help="Slice store path.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a store's schema version, config hash and every case with its status and split.

    Example: liverpipe store info stores/liver.zarr --json
    """
    from storage import SliceStore

    info = SliceStore.open(store).info()
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    table = Table(title=f"{store} (schema {info['schema_version']}, config {info['config_hash']})")
    for column in ("case", "status", "split", "shape (Z,Y,X)", "spacing (x,y,z) mm", "error"):
        table.add_column(column)
    for case in info["cases"]:
        shape = "x".join(str(v) for v in case["shape"]) if case["shape"] else "-"
        spacing = "x".join(f"{v:.2f}" for v in case["spacing"]) if case["spacing"] else "-"
        status = case["status"] + (" (source missing)" if case["source_missing"] else "")
        table.add_row(case["case_id"], status, case["split"], shape, spacing, case["error"] or "")
    table_console().print(table)


def _training_bar() -> Progress:
    """Progress bars with loss, images/s and ETA (one task per model)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[rate]:.1f} img/s"),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )


def _bar_task(bar: Progress, model: str, steps: int, batch: int) -> Callable[[int, float], None]:
    """A bar for one model and the ``on_step`` callback that moves it."""
    task = bar.add_task(f"training {model}", total=steps, loss=float("nan"), rate=0.0)
    start, first = time.perf_counter(), [-1]

    def on_step(step: int, loss: float) -> None:
        if first[0] < 0:  # count only this process's steps, not those before a resume
            first[0] = step - 1
        rate = batch * (step - first[0]) / max(time.perf_counter() - start, 1e-9)
        bar.update(task, completed=step, loss=loss, rate=rate)

    return on_step


@app.command("train")
def train_cmd(
    store: Annotated[
        Path, typer.Option("--store", "-s", help="Slice store made by `liverpipe preprocess`.")
    ],
    model: Annotated[str | None, typer.Option(help="unetplusplus, manet or deeplabv3plus.")] = None,
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Run folder: last.pt, best.pt, config.json, history.jsonl."
        ),
    ] = Path("runs/model"),
    steps: Annotated[int | None, typer.Option(min=1, help="Optimiser steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Batch size.")] = None,
    stage: Annotated[
        str,
        typer.Option(
            help="liver (stage 1, whole slices, \\[train]) or tumour (stage 2, liver ROI, \\[tumour])."
        ),
    ] = "liver",
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue exactly from OUT/last.pt.")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Train one stage of one model on the store's train split, validating on its val split.

    Example: liverpipe train --store stores/liver.zarr --model manet --stage tumour --out runs/manet/tumour --config configs/cpu.toml
    """
    _folder(out, "--out")
    from liverpipe.train import train

    if stage not in ("liver", "tumour"):
        raise typer.BadParameter(f"unknown stage {stage!r}; use liver or tumour")
    section = "train" if stage == "liver" else "tumour"
    settings = _settings(
        config, **{section: {"model": model, "steps": steps, "batch_size": batch_size}}
    )
    cfg = settings.stage(stage)  # type: ignore[arg-type]
    with _training_bar() as bar:
        on_step = _bar_task(bar, f"{cfg.model} {stage}", cfg.steps, cfg.batch_size)
        result = train(store, out, settings, resume=resume, on_step=on_step, stage=stage)  # type: ignore[arg-type]
    typer.echo(
        f"trained {cfg.model} ({stage}) for {result.steps_text} into {out}: last loss {result.last_loss:.4f}, best val score {result.best_score:.4f}"
    )


@app.command("train-all")
def train_all_cmd(
    store: Annotated[
        Path, typer.Option("--store", "-s", help="Slice store made by `liverpipe preprocess`.")
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Runs root; each train-all makes a new OUT/<run_id>/<model>/."
        ),
    ] = Path("runs"),
    steps: Annotated[int | None, typer.Option(min=1, help="Optimiser steps per model.")] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue the newest run's stages from their last.pt."),
    ] = False,
    gpus: Annotated[
        str,
        typer.Option(
            help="'auto' (every visible GPU), a list such as '0,1', or 'none'. With 2 or more, "
            "the jobs train in parallel, one per GPU; with one, one after another here; "
            "with none, side by side on the CPU (--cpu-jobs)."
        ),
    ] = "auto",
    cpu_jobs: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Without a GPU: jobs trained side by side, each in its own process with "
            "its share of the cores (default: one per core, at most the six jobs; 1: one "
            "after another here, with a progress bar).",
        ),
    ] = None,
    promote: Annotated[
        bool,
        typer.Option(
            help="Challenge the champions with the new run (the registry's rule); "
            "--no-promote leaves the registry alone (`liverpipe models promote` later)."
        ),
    ] = True,
    config: ConfigOpt = None,
) -> None:
    """Train both stages of UnetPlusPlus, MAnet and DeepLabV3Plus into a new versioned run
    OUT/<run_id>: one job per GPU in parallel, side by side on a machine without a GPU, or
    in turn. Then the run challenges the champions in OUT/registry.json
    (`liverpipe models list`).

    Example: liverpipe train-all --store stores/liver.zarr --out runs --config configs/tiny.toml
    """
    from liverpipe.train import ModelOutcome, parse_gpus, start_run, train_all

    settings = _settings(config, train={"steps": steps}, tumour={"steps": steps})
    devices = parse_gpus(gpus)
    run = start_run(_folder(out, "--out"), store, settings, resume=resume)
    typer.echo(f"run {run.name} -> {run}")

    def report(outcome: ModelOutcome) -> None:
        if outcome.result is None:
            say(f"{outcome.job} failed", "red", f"({outcome.device}): {outcome.error}")
            return
        r = outcome.result
        typer.echo(
            f"{outcome.job}: {r.steps_text}, last loss {r.last_loss:.4f}, best val score {r.best_score:.4f} ({outcome.device})"
        )

    def start(job: str) -> Callable[[int, float], None]:
        cfg = settings.stage("tumour" if job.endswith("tumour") else "liver")
        return _bar_task(bar, job, cfg.steps, cfg.batch_size)

    with _training_bar() as bar:
        outcomes = train_all(
            store,
            run,
            settings,
            resume=resume,
            gpus=devices,
            cpu_jobs=cpu_jobs,
            on_done=report,
            on_start=start,
        )
    failed = [o.job for o in outcomes if o.result is None]
    if failed:
        say(f"{len(failed)} of {len(outcomes)} models failed:", "red", ", ".join(failed))
        raise typer.Exit(1)
    if promote:
        from liverpipe.cli_models import print_decisions
        from liverpipe.models import pick_device
        from liverpipe.ops import challenge

        print_decisions(challenge(out, run.name, settings.registry, device=pick_device()))


def _threshold(value: str) -> float | None:
    """``--tumour-threshold``: a probability in (0, 1], or 'tuned' (None)."""
    if value.strip().lower() == "tuned":
        return None
    try:
        threshold = float(value)
    except ValueError:
        threshold = math.nan
    if not 0 < threshold <= 1:
        raise typer.BadParameter(f"{value!r} is neither a probability in (0, 1] nor 'tuned'")
    return threshold


@app.command("predict")
def predict_cmd(
    source: Annotated[Path, typer.Argument(help="A .nii/.nii.gz scan, or a folder of them.")],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Mask file (or folder, when INPUT is a folder)."),
    ],
    model: Annotated[
        list[Path] | None,
        typer.Option(
            "--model",
            "-m",
            help="Model folder RUNS/<run_id>/<model>, or a run RUNS/<run_id> (all its "
            "models); repeat it to ensemble. Default: the registry's ensemble champion.",
        ),
    ] = None,
    runs: Annotated[
        Path, typer.Option("--runs", "-r", help="Runs root whose champion predicts (no --model).")
    ] = Path("runs"),
    tta: Annotated[
        bool,
        typer.Option("--tta", help="Average the flips the models trained with (lr, ap)."),
    ] = False,
    largest_liver: Annotated[
        bool, typer.Option(help="Keep only the largest connected liver component.")
    ] = True,
    tumour_in_liver: Annotated[
        bool, typer.Option(help="Drop tumour not attached to liver tissue.")
    ] = True,
    min_lesion_mm3: Annotated[
        float,
        typer.Option(min=0, help="Tumour components smaller than this (mm³) become liver."),
    ] = 0.0,
    tumour_seed: Annotated[
        float,
        typer.Option(
            min=0,
            max=1,
            help="Tumour components whose tumour probability never reaches this become "
            "liver (confident lesions are kept whole); 0 turns it off.",
        ),
    ] = TUMOUR_SEED,
    tumour_threshold: Annotated[
        str,
        typer.Option(
            help="Tumour where its probability reaches this (a kept lesion's extent), or "
            "'tuned': each tumour stage's threshold tuned on its val cases.",
        ),
    ] = f"{TUMOUR_THRESHOLD:g}",
    device: Annotated[str, typer.Option(help="'auto', 'cpu', 'cuda' or 'cuda:N'.")] = "auto",
    seg: Annotated[
        bool,
        typer.Option(
            "--seg",
            help="For DICOM series, also write OUTPUT/<series>.seg.dcm (DICOM-SEG, liver and "
            "tumour segments referencing the source slices).",
        ),
    ] = False,
) -> None:
    """Segment new scans with the cascade: masks on each input's exact grid, plus
    measurements JSON.

    Example: liverpipe predict scans/ -o masks/ --runs runs --tta
    """
    threshold = _threshold(tumour_threshold)  # a bad value fails before models load
    from liverpipe.infer import PostProcess, Predictor, check_output, predict_path

    check_output(source, output)
    from liverpipe.models import expand_models, load_cascade, pick_device
    from liverpipe.ops import champion_models

    dev = pick_device(device)
    folders = expand_models(model) if model else champion_models(runs)
    cascades = [load_cascade(m, dev) for m in folders]
    post = PostProcess(largest_liver, tumour_in_liver, min_lesion_mm3, tumour_seed, threshold)
    predictor = Predictor(cascades, dev, tta, post)

    def report(scan: Path, outcome: object) -> None:
        if isinstance(outcome, Exception):
            say("failed", "red", str(outcome))
            return
        assert isinstance(outcome, dict)
        typer.echo(
            f"{scan.name}: liver {outcome['liver_volume_ml']:.0f} mL, {outcome['tumour_count']} lesion(s), "
            f"burden {outcome['tumour_burden_percent']:.2f}% -> {outcome['mask']}"
        )
        for warning in outcome.get("warnings", []):
            say("warning", "yellow", warning)

    results = predict_path(predictor, source, output, on_done=report, seg=seg)
    failed = [p for p, r in results.items() if isinstance(r, Exception)]
    if failed:
        say(f"{len(failed)} of {len(results)} scans failed:", "red", ", ".join(map(str, failed)))
        raise typer.Exit(1)


@app.command("convert")
def convert_cmd(
    series_dir: Annotated[
        Path, typer.Argument(help="A folder of DICOM slices (one series, or several).")
    ],
    output: Annotated[
        Path,
        typer.Argument(help="OUT.nii.gz for one series; a folder when there are several."),
    ],
    config: ConfigOpt = None,
) -> None:
    """Write DICOM CT series as NIfTI: slices sorted along the slice normal, spacing from
    the slice positions, HU after RescaleSlope/Intercept, the affine in RAS+ mm.

    Example: liverpipe convert dicom/ct_series ct.nii.gz
    """
    import nibabel as nib

    from liverpipe.io import find_series, is_nifti, write_nifti

    settings = _settings(config)
    found = find_series(series_dir)
    single = len(found) == 1 and is_nifti(output)
    _folder(output.parent if single else output, "OUTPUT")
    for series in found:
        out = output if single else output / f"{series.name}.nii.gz"
        write_nifti(series, out, settings.check)
        image = nib.Nifti1Image.from_filename(out)
        zooms = ", ".join(f"{z:.3f}" for z in image.header.get_zooms())
        typer.echo(
            f"{series.folder} ({len(series.files)} slices) -> {out}: {image.shape}, {zooms} mm"
        )


@app.command("evaluate")
def evaluate_cmd(
    store: Annotated[Path, typer.Option("--store", "-s", help="The store the runs trained on.")],
    runs: Annotated[
        Path, typer.Option("--runs", "-r", help="Runs folder of `liverpipe train-all`.")
    ] = Path("runs"),
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Report folder: metrics.json, report.md/.html.")
    ] = Path("report"),
    split: Annotated[
        list[str] | None,
        typer.Option(help="Split(s) to score: train, val, test; repeatable. Default: all three."),
    ] = None,
    tta: Annotated[
        bool, typer.Option("--tta", help="Average the flips each model trained with.")
    ] = False,
    device: Annotated[str, typer.Option(help="'auto', 'cpu', 'cuda' or 'cuda:N'.")] = "auto",
    empty_rule: Annotated[
        str | None,
        typer.Option(help="Empty ground truth: 'lits' (default) or 'exclude'; see the report."),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Score every run under RUNS and their ensemble on native grids; write the report.

    Example: liverpipe evaluate --store stores/liver.zarr --runs runs --out report
    """
    _folder(out, "--out")  # before the scoring, which takes minutes
    from liverpipe.evaluate import SPLITS, evaluate, headline_table, write_report
    from liverpipe.models import pick_device

    splits = split or list(SPLITS)
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise typer.BadParameter(f"unknown split(s) {unknown}; use train, val or test")
    settings = _settings(config, evaluate={"empty_rule": empty_rule})
    dev = pick_device(device)
    with _progress() as bar:
        task = bar.add_task("evaluating", total=None)
        result = evaluate(
            store,
            runs,
            splits=splits,
            device=dev,
            tta=tta,
            on_case=lambda s, c: bar.update(task, description=f"scored {s}/{c}", advance=1),
            settings=settings.evaluate,
        )
    paths = write_report(result, runs, out)
    headline = headline_table(result.aggregates())
    table = Table(*headline.head, title="headline (mean over cases)")
    for row in headline.rows:
        table.add_row(*row)
    table_console().print(table)
    typer.echo(f"report: {paths['html']} (metrics: {paths['metrics']})")


@app.command("config")
def show_config(config: ConfigOpt = None) -> None:
    """Print the resolved configuration (defaults, file, LIVERPIPE_* variables) as JSON.

    Example: liverpipe config --config configs/tiny.toml
    """
    typer.echo(json.dumps(_settings(config).model_dump(mode="json"), indent=2))


def main() -> None:
    """Console entry point: liverpipe and store errors become one readable line and exit
    code 2."""
    try:
        app()
    except FixableError as err:
        say("error:", "red", str(err))
        sys.exit(2)


if __name__ == "__main__":
    main()
