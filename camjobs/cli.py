"""The `camjobs` command line: a thin layer that builds a typed config and calls the stages.

Exit codes, for schedulers (camjobs.errors): 0 ok; 1 the job failed; 2 bad usage or configuration;
3 the job finished and wrote everything, but more inputs failed than --max-error-fraction;
130 `camjobs submit` stopped following its job (Ctrl-C). A CamjobsError from any command exits
with its own code (CamjobsGroup), so the same mistake gets the same code from every command.
"""

from __future__ import annotations

import inspect
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
    BoxSource,
    CategoryMode,
    ConfigError,
    DecodeOn,
    ExportFormat,
    GallerySort,
    Layout,
    Method,
    Pooling,
    Precision,
    RunConfig,
    SynthLayout,
    Target,
    redact_uri,
)
from camjobs.errors import EXIT_FAILED, EXIT_INTERRUPTED, CamjobsError, JobError, UsageError


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


def load_run_config(config_file: Path | None, flags: dict[str, Any]) -> RunConfig:
    """YAML file first, then every flag given on the command line on top of it; ConfigError for
    anything wrong with either (a YAML syntax error too)."""
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            loaded = yaml.safe_load(config_file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{config_file}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{config_file}: expected a mapping of option: value")
        values.update(loaded)
    values.update({k: v for k, v in flags.items() if v is not None})
    return RunConfig.from_mapping(values)


@app.command()
def run(
    data: str | None = typer.Option(None, "--data", help="Dataset directory or URI (s3://, gs://, local path)."),
    output: str | None = typer.Option(
        None, "--output", help="Output directory or URI: cams/, errors/, runs/ go here."
    ),
    config: Path | None = typer.Option(
        None, "--config", exists=True, dir_okay=False, help="YAML file with job options; flags override it."
    ),
    layout: Layout | None = typer.Option(None, help=f"Dataset layout (default: {_default('layout')})."),
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
    decode_on: DecodeOn | None = typer.Option(
        None,
        help="Where JPEGs are decoded; gpu = by the model actors with nvJPEG, for JPEG datasets on GPU "
        f"machines (default: {_default('decode_on')}).",
    ),
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
    refine: bool | None = typer.Option(
        None,
        "--refine",
        help="Also write a lesion mask (mask_rle) and its boxes (refined_boxes): the CAM picks the region, the image draws its outline.",
    ),
    address: str | None = typer.Option(
        None, help="Ray cluster address (default: RAY_ADDRESS, else a new local cluster)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Compute CAM heatmaps and boxes for every image of a dataset, as a Ray job."""
    _setup_logging(verbose)
    flags = dict(locals())
    for name in ("config", "verbose"):
        flags.pop(name)
    cfg = load_run_config(config, flags)

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


@app.command()
def train(
    data: str = typer.Option(..., "--data", help="Dataset directory in any supported layout."),
    out: Path = typer.Option(..., "--out", help="Checkpoint file to write (and OUT.resume.pt after every epoch)."),
    model: str = typer.Option(
        "resnet18",
        help="Architecture with a GAP -> linear head: a torchvision name, efficientnet_lite0 (pip install 'camjobs[efficientnet]'), or timm/NAME (timm's NAME, where timm is installed).",
    ),
    pooling: Pooling = typer.Option(
        Pooling.GAP,
        help="Global pooling before the final linear layer: gap (average) or gmp (max, in place of the "
        "model's average pool); recorded in the checkpoint.",
    ),
    epochs: int = typer.Option(5, help="Training epochs (in all, counting those before --resume)."),
    input_size: int = typer.Option(224, help="Square input size."),
    batch_size: int = typer.Option(32, help="Batch size (per worker with --workers)."),
    lr: float = typer.Option(1e-3, help="Learning rate (AdamW)."),
    layout: Layout = typer.Option(Layout.AUTO, help="Dataset layout."),
    weights: str | None = typer.Option(
        None,
        help="'imagenet' (torchvision's weights, downloaded: needs internet; efficientnet_lite0's come with its package, offline; timm's from its local caches) or a local weights file to start from.",
    ),
    weights_file: Path | None = typer.Option(
        None,
        "--weights-file",
        exists=True,
        dir_okay=False,
        help="Local weights file for --model to start from (e.g. torchvision's resnet18-f37072fd.pth); the classifier is replaced for the dataset's classes.",
    ),
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
    workers: int = typer.Option(
        0,
        help="0: train in this process; N: data-parallel on N Ray Train workers (one GPU each where the cluster has GPUs).",
    ),
    address: str | None = typer.Option(
        None, help="Ray cluster for --workers (default: RAY_ADDRESS, else a new local cluster)."
    ),
    ray_storage: str | None = typer.Option(
        None,
        "--ray-storage",
        help="Ray Train storage for --workers: shared (NFS path, s3://...) on several nodes (default: a folder next to --out, removed after success).",
    ),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Fine-tune a GAP (or --pooling gmp) classifier and write a camjobs checkpoint."""
    _setup_logging(False)
    if weights is not None and weights_file is not None:
        raise UsageError("give --weights or --weights-file, not both")
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
                weights=str(weights_file) if weights_file is not None else weights,
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
    typer.echo(
        f"checkpoint: {result.checkpoint} after {result.epochs_run} epoch(s) (validation accuracy "
        f"{result.val_accuracy:.1%}, balanced accuracy {result.val_balanced_accuracy:.1%}); resume file: {result.resume_file}"
    )


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
        f"{report.runs} runs, {report.rows['cams']} cams rows, {report.rows['errors']} error rows, {len(report.problems)} problems"
    )
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)


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
        ..., "--to", help="File to write (coco; labelstudio, with its labeling config next to it) or folder (yolo)."
    ),
    min_score: float = typer.Option(
        0.0,
        "--min-score",
        help="Drop boxes scoring below this (CAM box scores lie in [threshold, 1]; a refined box's is the normalized map's mean over its mask).",
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
) -> None:
    """Export the newest boxes per image as COCO JSON, Label Studio tasks with predictions, or YOLO labels."""
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
    """Draw image | heatmap | blend with boxes (and refined mask outlines) per image, and a sortable index.html gallery."""
    _setup_logging(False)
    from camjobs.labels.viz import render_gallery

    # VizError and LayoutError are UsageErrors; any other ValueError is taken for one too.
    with _reported(OSError), _reported(ValueError, error=UsageError):
        result = render_gallery(output, to, limit=limit, sort=sort.value, data=data, layout=layout.value)
    typer.echo(result.message())


# --- Ray Jobs API: run the job on a remote cluster -------------------------------------------------

AddressOption = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="Ray Jobs API (dashboard) URL, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS).",
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        help="Cluster auth token (default: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token). Never printed.",
        show_default=False,
    ),
]
# `run` options that `submit` declares itself: its --address is the Jobs API's URL (the job joins
# the cluster it runs on), and its --config is a path on the cluster, not checked for here.
NOT_PASSED_THROUGH = ("address", "config")


def with_run_options(func):
    """Give a command every option of `run` (but --address and --config) ahead of its own.

    The command takes them as **job_options, so an option added to `run` is submitted too.
    """
    shared = [
        param.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for param in inspect.signature(run, eval_str=True).parameters.values()
        if param.name not in NOT_PASSED_THROUGH
    ]
    own = [
        param.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for param in inspect.signature(func, eval_str=True).parameters.values()
        if param.kind is not param.VAR_KEYWORD
    ]
    func.__signature__ = inspect.Signature(shared + own)
    return func


def _cluster(address: str | None, token: str | None):
    """Connect to the Jobs API; a SubmitError (exit 2) says why not."""
    from camjobs.cluster import submit as jobs

    url, _ = jobs.resolve_address(address)
    secret, source = jobs.resolve_token(token)
    return jobs.connect(url, secret, source, warn=lambda message: typer.echo(f"camjobs: warning: {message}", err=True))


def _check_job_options(config: str | None, flags: dict[str, Any]) -> None:
    """Validate the job options here, so a mistake fails now rather than on the cluster (skipped
    when --config names a file that exists only there)."""
    if config is not None and not Path(config).is_file():
        return
    load_run_config(Path(config) if config else None, flags)


@app.command()
@with_run_options
def submit(
    config: str | None = typer.Option(
        None, "--config", help="YAML file of job options, read on the cluster; flags override it."
    ),
    address: AddressOption = None,
    token: TokenOption = None,
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Stream the job's logs and exit with its exit code."),
    submission_id: str | None = typer.Option(
        None, help="Submission id to use (unique per cluster; default: Ray picks one)."
    ),
    python: str = typer.Option("python", help="The cluster's Python interpreter for the job's command."),
    pip: list[str] | None = typer.Option(
        None,
        "--pip",
        help="Have Ray pip-install this requirement for the job (repeatable; needs the cluster to reach a package index).",
    ),
    **job_options: Any,
) -> None:
    """Run `camjobs run` on a Ray cluster through its Jobs API; prints the submission id last.

    Takes every option of `run` but --address, as `python -m camjobs run ...` on the cluster, with
    this camjobs package shipped along. Paths (--data, --output, --checkpoint, --config) are read
    by the job on the cluster: they must exist there, and relative ones are relative to the job's
    working directory there.
    """
    from camjobs.cluster import submit as jobs

    _setup_logging(bool(job_options.get("verbose")))
    _check_job_options(config, {k: v for k, v in job_options.items() if k != "verbose"})
    cluster = _cluster(address, token)
    command = jobs.entrypoint({"config": config, **job_options}, python=python)
    job_id = jobs.submit(cluster, command, jobs.runtime_env(pip), submission_id)
    typer.echo(f"camjobs: submitted {job_id} to {cluster.address}", err=True)
    if not wait:
        typer.echo(job_id)
        return
    try:
        info = jobs.follow(cluster, job_id, write=lambda text: typer.echo(text, nl=False))
    except jobs.SubmitError as exc:
        typer.echo(job_id)
        raise jobs.SubmitError(
            f"{exc} (job {job_id} may still be running: camjobs status {job_id})", exc.exit_code
        ) from exc
    except KeyboardInterrupt:
        typer.echo(f"camjobs: stopped following; job {job_id} goes on (camjobs stop {job_id} stops it)", err=True)
        typer.echo(job_id)
        raise typer.Exit(EXIT_INTERRUPTED)
    code = jobs.exit_code(info)
    exit_note = f", exit code {info.driver_exit_code}" if getattr(info, "driver_exit_code", None) is not None else ""
    typer.echo(f"camjobs: job {job_id} {info.status}{exit_note}", err=True)
    typer.echo(job_id)
    if code:
        raise typer.Exit(code)


@app.command()
def status(
    job_id: str = typer.Argument(..., help="Submission id."),
    address: AddressOption = None,
    token: TokenOption = None,
    as_json: bool = typer.Option(False, "--json", help="Print Ray's whole job record as JSON."),
) -> None:
    """Show a submitted job's status and, once it ended, its exit code."""
    import json

    from camjobs.cluster import submit as jobs

    cluster = _cluster(address, token)
    info = jobs.job_info(cluster, job_id)
    if as_json:
        typer.echo(json.dumps(jobs.info_dict(info), indent=2))
        return
    for name, value in jobs.summary_lines(info):
        typer.echo(f"{name}: {value}")


@app.command()
def logs(
    job_id: str = typer.Argument(..., help="Submission id."),
    address: AddressOption = None,
    token: TokenOption = None,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends."),
) -> None:
    """Print a submitted job's logs (its driver's stdout and stderr)."""
    from camjobs.cluster import submit as jobs

    cluster = _cluster(address, token)
    if follow:
        jobs.follow(cluster, job_id, write=lambda text: typer.echo(text, nl=False))
    else:
        typer.echo(jobs.job_logs(cluster, job_id), nl=False)


@app.command()
def stop(
    job_id: str = typer.Argument(..., help="Submission id."),
    address: AddressOption = None,
    token: TokenOption = None,
) -> None:
    """Stop a submitted job (SIGTERM, then SIGKILL after Ray's grace period)."""
    from camjobs.cluster import submit as jobs

    cluster = _cluster(address, token)
    stopped = jobs.stop(cluster, job_id)
    state = "" if stopped else jobs.job_info(cluster, job_id).status
    typer.echo(f"stopping {job_id}" if stopped else f"{job_id} is not running ({state})")


@app.command("list")
def list_(
    address: AddressOption = None,
    token: TokenOption = None,
    as_json: bool = typer.Option(False, "--json", help="Print Ray's job records as JSON."),
) -> None:
    """List the cluster's submitted jobs, oldest first."""
    import json

    from camjobs.cluster import submit as jobs

    cluster = _cluster(address, token)
    found = jobs.list_jobs(cluster)
    if as_json:
        typer.echo(json.dumps([jobs.info_dict(info) for info in found], indent=2))
        return
    typer.echo(f"{'SUBMISSION ID':<30} {'STATUS':<10} {'EXIT':>4}  {'STARTED':<20}  ENTRYPOINT")
    for info in found:
        fields = dict(jobs.summary_lines(info))
        entry = fields["entrypoint"] if len(fields["entrypoint"]) <= 70 else fields["entrypoint"][:67] + "..."
        typer.echo(
            f"{fields['submission_id']:<30} {fields['status']:<10} {fields['exit_code']:>4}  {fields['start_time']:<20}  {entry}"
        )
