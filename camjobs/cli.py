"""The `camjobs` command line: a thin layer that builds a typed config and calls the stages.

Exit codes, for schedulers (camjobs.errors): 0 ok; 1 the job failed; 2 bad usage or configuration;
3 the job finished and wrote everything, but more inputs failed than --max-error-fraction;
130 `camjobs run` interrupted by SIGINT (Ctrl-C; `camjobs submit`: stopped following its job);
143 `camjobs run` stopped by SIGTERM. A CamjobsError from any command exits
with its own code (CamjobsGroup), so the same mistake gets the same code from every command.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from typer.core import TyperGroup

from camjobs.config import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_THRESHOLD,
    DEFAULT_VAL_FRACTION,
    BoxSource,
    CategoryMode,
    ConfigError,
    DecodeOn,
    ExportFormat,
    GallerySort,
    ImageMode,
    Layout,
    Method,
    Pooling,
    Precision,
    RunConfig,
    SynthLayout,
    Target,
    redact_uri,
)
from camjobs.errors import EXIT_FAILED, CamjobsError, JobError, UsageError
from camjobs.interrupt import stop_on_signals


class CamjobsGroup(TyperGroup):
    """The command group: reports a CamjobsError from any command as one line, and exits with its code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CamjobsError as exc:
            typer.echo(f"camjobs: error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from exc


app = typer.Typer(
    name="camjobs",
    help="Class activation maps and weak lesion boxes for whole dermoscopy datasets, on Ray, to Parquet.",
    cls=CamjobsGroup,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # help texts are plain: "[threshold, 1]" is not a style tag
    pretty_exceptions_enable=False,
)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(format="camjobs: %(message)s", level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("camjobs").setLevel(logging.DEBUG if verbose else logging.INFO)


@contextmanager
def _reported(*caught: type[Exception], error: type[CamjobsError] = JobError) -> Iterator[None]:
    """Report the exceptions a command expects from its work as `error` (exit 1 by default);
    a CamjobsError keeps its own code."""
    try:
        yield
    except CamjobsError:
        raise
    except caught as exc:
        raise error(str(exc)) from exc


def _default(name: str) -> Any:
    """A RunConfig field's default, for the help texts (camjobs.config owns the defaults)."""
    return RunConfig.__dataclass_fields__[name].default


WRITE_MODES = ("incremental", "overwrite", "append")


def load_run_config(config_file: Path | None, flags: dict[str, Any]) -> RunConfig:
    """YAML file first, then every flag given on the command line on top of it (a write-mode flag
    replaces the file's write mode); ConfigError for anything wrong with either (a YAML syntax error too)."""
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            loaded = yaml.safe_load(config_file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{config_file}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{config_file}: expected a mapping of option: value")
        values.update(loaded)
    if any(flags.get(mode) for mode in WRITE_MODES):
        values.update(dict.fromkeys(WRITE_MODES, False))
    values.update({k: v for k, v in flags.items() if v is not None})
    return RunConfig.from_mapping(values)


# Options whose help runs over a line, declared once here (Typer's Annotated style).
DecodeOnOption = Annotated[
    DecodeOn | None,
    typer.Option(
        help="Where JPEGs are decoded; gpu = by the model actors with nvJPEG, for JPEG datasets on GPU "
        f"machines (default: {_default('decode_on')}).",
    ),
]
RehashOption = Annotated[
    bool | None,
    typer.Option("--rehash", help="With --incremental: hash every image that has a row, even if size and mtime match."),
]
OverwriteOption = Annotated[
    bool | None,
    typer.Option(
        "--overwrite",
        help="Replace the rows the output holds for this model and these settings (readers see the old rows "
        "or the new, never neither). Without a write mode, a run into such an output is refused.",
    ),
]
AppendOption = Annotated[
    bool | None,
    typer.Option(
        "--append", help="Keep the rows the output holds for this model and these settings, and add a second set."
    ),
]
LockLeaseOption = Annotated[
    float | None,
    typer.Option(
        "--lock-lease",
        metavar="SECONDS",
        help="The output lock's lease: the run renews it every third of this; a lock not renewed for longer "
        f"is taken over by the next run, from any host (default: {_default('lock_lease'):g}).",
    ),
]
LabelColumnOption = Annotated[
    str | None,
    typer.Option(
        "--label-column",
        help="isic-archive layout: the metadata.csv column that holds the labels, e.g. diagnosis_1, "
        "benign_malignant (default: diagnosis_3, the diagnosis; an empty cell is no label).",
    ),
]
RefineOption = Annotated[
    bool | None,
    typer.Option(
        "--refine",
        help="Also write a lesion mask (mask_rle) and its boxes (refined_boxes): the CAM picks the region, "
        "the image draws its outline.",
    ),
]


@app.command()
def run(
    data: str | None = typer.Option(None, "--data", help="Dataset directory or URI (s3://, gs://, local path)."),
    output: str | None = typer.Option(None, "--output", help="Output directory or URI: cams/, errors/, runs/ go here."),
    config: Path | None = typer.Option(
        None, "--config", exists=True, dir_okay=False, help="YAML file with job options; flags override it."
    ),
    layout: Layout | None = typer.Option(None, help=f"Dataset layout (default: {_default('layout')})."),
    label_column: LabelColumnOption = None,
    checkpoint: str | None = typer.Option(
        None, help="Checkpoint file (camjobs train's format, or a bare state_dict with --model/--classes)."
    ),
    model: str | None = typer.Option(None, help="torchvision architecture name, e.g. resnet50."),
    classes: str | None = typer.Option(
        None, help="Comma-separated class names, for --model without a camjobs checkpoint."
    ),
    weights: str | None = typer.Option(
        None, help="'imagenet' (torchvision weights API, needs internet) or a local torchvision weights file."
    ),
    input_size: int | None = typer.Option(None, help="Model input size (default: the checkpoint's, else 224)."),
    method: Method | None = typer.Option(None, help=f"CAM method (default: {_default('method')})."),
    threshold: float | None = typer.Option(
        None, help=f"Box threshold as a fraction of the map's maximum (default: {DEFAULT_THRESHOLD})."
    ),
    target: Target | None = typer.Option(
        None, help=f"Which class to explain: the predicted one or the label (default: {_default('target')})."
    ),
    actors: int | None = typer.Option(None, help="Model actors (default: one per GPU, else 1)."),
    gpus_per_actor: float | None = typer.Option(
        None, help="GPUs per actor (default: 1 where the cluster has GPUs, else 0)."
    ),
    batch_size: int | None = typer.Option(
        None, help="Images per model batch (default: 256 on GPU at 224 px, scaled by input area; 16 on CPU)."
    ),
    precision: Precision | None = typer.Option(
        None, help=f"The forward pass's precision (default: {_default('precision')} = bf16 on GPU, fp32 on CPU)."
    ),
    decode_on: DecodeOnOption = None,
    heatmap_max_side: int | None = typer.Option(
        None, help="Store heatmaps scaled down to this longer side, for very large images (default: the image's size)."
    ),
    max_error_fraction: float | None = typer.Option(
        None, help=f"Above this fraction of failed inputs, exit 3 (default: {_default('max_error_fraction')})."
    ),
    max_pixels: int | None = typer.Option(
        None, help=f"Refuse images with more pixels (decompression bombs) (default: {DEFAULT_MAX_PIXELS})."
    ),
    follow_symlinks: bool | None = typer.Option(
        None, "--follow-symlinks", help="Allow symlinks that point outside the dataset root."
    ),
    incremental: bool | None = typer.Option(
        None, "--incremental", help="Skip images that already have a row for this model and these settings."
    ),
    rehash: RehashOption = None,
    overwrite: OverwriteOption = None,
    append: AppendOption = None,
    refine: RefineOption = None,
    address: str | None = typer.Option(
        None, help="Ray cluster address (default: RAY_ADDRESS, else a new local cluster)."
    ),
    lock_lease: LockLeaseOption = None,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Compute CAM heatmaps and boxes for every image of a dataset, as a Ray job.

    SIGINT (Ctrl-C) or SIGTERM stops it cleanly: nothing is published, and it exits 130 or 143."""
    _setup_logging(verbose)
    flags = {name: value for name, value in locals().items() if name not in ("config", "verbose")}
    cfg = load_run_config(config, flags)
    with stop_on_signals():
        from camjobs.pipeline.job import run_job

        with _reported(FileNotFoundError, ValueError, RuntimeError, OSError):
            result = run_job(cfg)
    typer.echo(f"run {result.run_id}: {result.message}")
    shown = redact_uri(cfg.output.rstrip("/"))  # an s3:// URI may carry credentials
    typer.echo(f"results: {shown}/cams  errors: {shown}/errors  summary: {redact_uri(result.summary_path)}")
    if result.exit_code:
        raise CamjobsError(result.message, exit_code=result.exit_code)


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Folder to write the synthetic dataset into."),
    layout: SynthLayout = typer.Option(SynthLayout.HAM10000, help="Layout to write."),
    n: int = typer.Option(300, "--n", help="Number of images."),
    seed: int = typer.Option(0, help="Random seed: same seed, same dataset."),
) -> None:
    """Generate a synthetic dermoscopy dataset in the real HAM10000 layout."""
    _setup_logging(False)
    from camjobs.synth import synth_dataset

    with _reported(ValueError, error=UsageError):
        summary = synth_dataset(out, layout=layout.value, n=n, seed=seed, progress=True)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(summary.class_counts.items()))
    typer.echo(f"{summary.n} images in {summary.out_dir} ({counts})")


ArchOption = Annotated[
    str,
    typer.Option(
        help="Architecture with a GAP -> linear head: a torchvision name, efficientnet_lite0 (pip install "
        "'camjobs[efficientnet]'), or timm/NAME (timm's NAME, where timm is installed).",
    ),
]
PoolingOption = Annotated[
    Pooling,
    typer.Option(
        help="Global pooling before the final linear layer: gap (average) or gmp (max, in place of the "
        "model's average pool); recorded in the checkpoint.",
    ),
]
StartWeightsOption = Annotated[
    str | None,
    typer.Option(
        help="'imagenet' (torchvision's weights, downloaded: needs internet; efficientnet_lite0's come with its "
        "package, offline; timm's from its local caches) or a local weights file to start from.",
    ),
]
WeightsFileOption = Annotated[
    Path | None,
    typer.Option(
        "--weights-file",
        exists=True,
        dir_okay=False,
        help="Local weights file for --model to start from (e.g. torchvision's resnet18-f37072fd.pth); the "
        "classifier is replaced for the dataset's classes.",
    ),
]
WorkersOption = Annotated[
    int,
    typer.Option(
        help="0: train in this process; N: data-parallel on N Ray Train workers (one GPU each where the "
        "cluster has GPUs).",
    ),
]
RayStorageOption = Annotated[
    str | None,
    typer.Option(
        "--ray-storage",
        help="Ray Train storage for --workers: shared (NFS path, s3://...) on several nodes (default: a folder "
        "next to --out, removed after success).",
    ),
]


@app.command()
def train(
    data: str = typer.Option(..., "--data", help="Dataset directory in any supported layout."),
    out: Path = typer.Option(..., "--out", help="Checkpoint file to write (and OUT.resume.pt after every epoch)."),
    model: ArchOption = "resnet18",
    pooling: PoolingOption = Pooling.GAP,
    epochs: int = typer.Option(5, help="Training epochs (in all, counting those before --resume)."),
    input_size: int = typer.Option(224, help="Square input size."),
    batch_size: int = typer.Option(32, help="Batch size (per worker with --workers)."),
    lr: float = typer.Option(1e-3, help="Learning rate (AdamW)."),
    layout: Layout = typer.Option(Layout.AUTO, help="Dataset layout."),
    label_column: LabelColumnOption = None,
    weights: StartWeightsOption = None,
    weights_file: WeightsFileOption = None,
    balanced: bool = typer.Option(
        True, "--balanced/--no-balanced", help="Class-balanced sampling: draw with replacement, weights 1/class count."
    ),
    val_fraction: float = typer.Option(
        0.2, help="Validation share, split by lesion (no lesion on both sides) and stratified by class."
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue from OUT.resume.pt, written after every epoch, up to --epochs (same data and settings).",
    ),
    workers: WorkersOption = 0,
    address: str | None = typer.Option(
        None, help="Ray cluster for --workers (default: RAY_ADDRESS, else a new local cluster)."
    ),
    ray_storage: RayStorageOption = None,
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Fine-tune a GAP (or --pooling gmp) classifier and write a camjobs checkpoint."""
    _setup_logging(False)
    if weights is not None and weights_file is not None:
        raise UsageError("give --weights or --weights-file, not both")
    start = str(weights_file) if weights_file is not None else weights
    from camjobs.preflight import check_train

    check_train(data, str(out), layout, start, "--weights-file" if weights_file is not None else "--weights")
    from camjobs.models.train import TrainConfig, train_model

    with _reported(ValueError, FileNotFoundError, RuntimeError, OSError):
        result = train_model(
            TrainConfig(
                data=data,
                out=str(out),
                arch=model,
                epochs=epochs,
                input_size=input_size,
                batch_size=batch_size,
                lr=lr,
                layout=layout.value,
                label_column=label_column,
                weights=start,
                seed=seed,
                val_fraction=val_fraction,
                balanced=balanced,
                resume=resume,
                workers=workers,
                address=address,
                storage_path=ray_storage,
                pooling=pooling.value,
            )
        )
    typer.echo(_trained_line(result))


def _trained_line(result) -> str:
    """Which epoch the checkpoint holds and why, and that --resume continues from the last one."""
    if result.kept_by == "last":
        kept = f"epoch {result.best_epoch} of {result.epochs_run}, the last (no validation images to choose by)"
    else:
        kept = (
            f"epoch {result.best_epoch} of {result.epochs_run}, the best by validation balanced accuracy "
            f"({result.val_balanced_accuracy:.1%}; accuracy {result.val_accuracy:.1%})"
        )
    resume = f"resume file (epoch {result.epochs_run}): {result.resume_file}"
    return f"checkpoint: {result.checkpoint} holds {kept}; {resume}"


@app.command()
def demo(
    output: Path = typer.Option(Path("camjobs-demo"), help="Folder for the synthetic data, checkpoint and results."),
    n: int = typer.Option(240, "--n", help="Synthetic images."),
    epochs: int = typer.Option(12, help="Training epochs (about 5 s each on 2 CPU cores)."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Synthesize data, train a small model, run the Ray job and summarize: no GPU, no internet."""
    _setup_logging(False)
    from camjobs.demo import run_demo

    result = run_demo(output, n=n, epochs=epochs, seed=seed, echo=typer.echo)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


@app.command()
def verify(
    output: str = typer.Option(..., "--output", help="Output directory or URI written by camjobs run."),
) -> None:
    """Check an output folder: readable files, no duplicates, run summaries that match their rows."""
    _setup_logging(False)
    from camjobs.labels.verify import verify_output

    report = verify_output(output)
    for note in report.notes:
        typer.echo(f"note: {note}", err=True)
    for problem in report.problems:
        typer.echo(f"problem: {problem}", err=True)
    typer.echo(
        f"{report.runs} runs, {report.rows['cams']} cams rows, {report.rows['errors']} error rows, "
        f"{len(report.problems)} problems"
    )
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)


@app.command()
def compact(
    output: str = typer.Option(..., "--output", help="Output directory or URI written by camjobs run."),
    file_rows: int = typer.Option(1_000_000, min=1, help="Rows at which a rewritten file is full."),
    file_mb: int = typer.Option(512, min=1, help="MiB at which a rewritten file is full."),
) -> None:
    """Rewrite a grown cams/ and errors/ into few large files, atomically; every reader keeps working."""
    _setup_logging(False)
    from camjobs.compact import compact as compact_output
    from camjobs.parquet_files import FileTarget

    result = compact_output(output, target=FileTarget(file_rows, file_mb * 2**20), progress=sys.stderr.isatty())
    files = ", ".join(f"{name} {c['files_before']} -> {c['files_after']} files" for name, c in result.counts.items())
    done = "nothing to do" if result.compaction_id is None else f"compaction {result.compaction_id}"
    typer.echo(f"{done}: {files}; {sum(c.get('rows_dropped', 0) for c in result.counts.values())} hidden rows dropped")


@app.command()
def evaluate(
    output: str = typer.Option(..., "--output", help="Output directory or URI written by camjobs run."),
    data: str | None = typer.Option(
        None, "--data", help="Dataset with lesion masks (ham10000, isic2017, isic2018 layouts)."
    ),
    masks: str | None = typer.Option(
        None, "--masks", help="Folder of <image_id>_segmentation.png (or <image_id>.png) masks."
    ),
    boxes: str | None = typer.Option(
        None, "--boxes", help="COCO json: bbox (x, y, w, h) per image, matched by file_name or id."
    ),
    report: str | None = typer.Option(None, "--report", help="Report folder (default: OUTPUT/eval)."),
    run_id: str | None = typer.Option(
        None, "--run-id", help="Only this run's rows (default: the newest run's model and settings, over all runs)."
    ),
    max_side: int = typer.Option(1024, help="Sweep metrics on a grid of at most this long side; 0: the full size."),
    image_baselines: bool = typer.Option(
        True,
        "--image-baselines/--no-image-baselines",
        help="Read each row's image (source_path) for the Otsu lesion baseline; off for outputs whose images are gone.",
    ),
) -> None:
    """Localization metrics of the maps (MaxBoxAcc, MaxBoxAccV2, PxAP, top-1/GT-known Loc, IoU, Jaccard) beside
    the refined labels of a --refine run and the Otsu, centre-box and constant-map baselines."""
    _setup_logging(False)
    from camjobs.labels.evaluate import evaluate_output

    with _reported(ValueError, OSError):  # an EvaluationError is a UsageError: exit 2
        result = evaluate_output(
            output,
            data=data,
            masks=masks,
            boxes=boxes,
            run_id=run_id,
            report_dir=report,
            max_side=max_side or None,
            progress=True,
            image_baselines=image_baselines,
        )
    typer.echo(result.table())
    typer.echo(f"report: {result.report_dir}")


# --- Exports and a gallery of the results ---------------------------------------------------------


@app.command("export")
def export_(
    output: str = typer.Option(
        ..., "--output", help="The job's output directory or URI (reads OUTPUT/cams and OUTPUT/runs)."
    ),
    fmt: ExportFormat = typer.Option(..., "--format", help="Export format."),
    to: str = typer.Option(
        ...,
        "--to",
        help="File to write (coco; isic-csv; labelstudio, with its labeling config next to it) or folder (yolo).",
    ),
    min_score: float = typer.Option(
        0.0,
        "--min-score",
        help=(
            "Drop boxes scoring below this (CAM box scores lie in [threshold, 1]; a refined box's is the normalized "
            "map's mean over its mask)."
        ),
    ),
    image_root: str | None = typer.Option(
        None,
        "--image-root",
        help="URL where the dataset root (--data of the run) is served: images are <image-root>/<path below the root>.",
    ),
    categories: CategoryMode = typer.Option(
        CategoryMode.LESION,
        "--categories",
        help="lesion: one category; classes: the model's classes (a box gets its image's target_label).",
    ),
    boxes: BoxSource = typer.Option(
        BoxSource.AUTO,
        "--boxes",
        help="auto: refined_boxes (with their masks: COCO segmentation, Label Studio polygons) where a row has them "
        "(camjobs run --refine), else the CAM boxes; cam: the CAM boxes only, as before masks existed; refined: "
        "refined_boxes only, images without them listed with no box.",
    ),
    images: ImageMode = typer.Option(
        ImageMode.LINK,
        "--images",
        help="yolo: each image in images/ as a symlink to the file the run read (link), or a copy (copy: a folder "
        "to move or upload; needed where the sources are URIs).",
    ),
    val_fraction: float = typer.Option(
        DEFAULT_VAL_FRACTION,
        "--val-fraction",
        help="yolo: the fraction of images in the val split, chosen by a hash of the image_id (the same side in "
        "every export); 0: every image in train, and val is train.",
    ),
) -> None:
    """Export the newest boxes per image as COCO JSON, Label Studio tasks with predictions, or YOLO labels;
    or every class's probability as an ISIC challenge CSV (isic-csv, which ignores the box options)."""
    _setup_logging(False)
    from camjobs.labels.export import export

    with _reported(OSError):  # an ExportError is a UsageError: exit 2
        result = export(
            output,
            fmt.value,
            to,
            min_score=min_score,
            image_root=image_root,
            categories=categories.value,
            boxes=boxes.value,
            images=images.value,
            val_fraction=val_fraction,
        )
    typer.echo(result.message())


@app.command()
def viz(
    output: str = typer.Option(..., "--output", help="The job's output directory or URI (reads OUTPUT/cams)."),
    to: Path = typer.Option(..., "--to", file_okay=False, help="Local folder for the PNG panels and index.html."),
    limit: int = typer.Option(50, "--limit", min=1, help="Images to draw."),
    sort: GallerySort = typer.Option(
        GallerySort.WORST,
        "--sort",
        help="By IoU of boxes[0] with the mask's box (needs --data with masks; else by pred_score).",
    ),
    data: str | None = typer.Option(
        None, "--data", help="The dataset, for ground-truth masks (HAM10000, ISIC 2017, ISIC 2018 layouts)."
    ),
    layout: Layout = typer.Option(Layout.AUTO, help="Layout of --data."),
) -> None:
    """Draw image | heatmap | blend with boxes (and refined mask outlines) per image, and a sortable
    index.html gallery."""
    _setup_logging(False)
    from camjobs.labels.viz import render_gallery

    # VizError and LayoutError are UsageErrors; any other ValueError is taken for one too.
    with _reported(OSError), _reported(ValueError, error=UsageError):
        result = render_gallery(output, to, limit=limit, sort=sort.value, data=data, layout=layout.value)
    typer.echo(result.message())


# The cluster commands (submit, status, logs, stop, list) register themselves on `app`.
from camjobs.cluster import commands as _cluster_commands  # noqa: E402, F401
