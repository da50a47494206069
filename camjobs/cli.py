"""The `camjobs` command line: a thin layer that builds a typed config and calls the stages.

Exit codes, for schedulers: 0 ok; 1 the job failed; 2 bad usage or configuration;
3 the job finished and wrote everything, but more inputs failed than --max-error-fraction.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Optional

import typer
import yaml

from camjobs.config import ConfigError, RunConfig

app = typer.Typer(
    name="camjobs",
    help="Class activation maps and weak lesion boxes for whole dermoscopy datasets, on Ray, to Parquet.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_USAGE = 2


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(format="camjobs: %(message)s", level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("camjobs").setLevel(logging.DEBUG if verbose else logging.INFO)


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"camjobs: error: {message}", err=True)
    return typer.Exit(code)


def load_run_config(config_file: Optional[Path], flags: dict[str, Any]) -> RunConfig:
    """YAML file first, then every flag given on the command line on top of it."""
    values: dict[str, Any] = {}
    if config_file is not None:
        loaded = yaml.safe_load(config_file.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{config_file}: expected a mapping of option: value")
        values.update(loaded)
    values.update({k: v for k, v in flags.items() if v is not None})
    return RunConfig.from_mapping(values)


@app.command()
def run(
    data: Optional[str] = typer.Option(None, "--data", help="Dataset directory or URI (s3://, gs://, local path)."),
    output: Optional[str] = typer.Option(None, "--output", help="Output directory or URI: cams/, errors/, runs/ go here."),
    config: Optional[Path] = typer.Option(None, "--config", exists=True, dir_okay=False, help="YAML file with job options; flags override it."),
    layout: Optional[str] = typer.Option(None, help="auto|ham10000|isic2017|isic2018|isic2019|isic2020|folder [default: auto]"),
    checkpoint: Optional[str] = typer.Option(None, help="Checkpoint file (camjobs train's format, or a bare state_dict with --model/--classes)."),
    model: Optional[str] = typer.Option(None, help="torchvision architecture name, e.g. resnet50."),
    classes: Optional[str] = typer.Option(None, help="Comma-separated class names, for --model without a camjobs checkpoint."),
    weights: Optional[str] = typer.Option(None, help="'imagenet' (torchvision weights API, needs internet) or a local torchvision weights file."),
    input_size: Optional[int] = typer.Option(None, help="Model input size [default: the checkpoint's, else 224]."),
    method: Optional[str] = typer.Option(None, help="cam|gradcam|gradcam++ [default: cam]"),
    threshold: Optional[float] = typer.Option(None, help="Box threshold as a fraction of the map's maximum [default: 0.2]."),
    target: Optional[str] = typer.Option(None, help="predicted|label: which class to explain [default: predicted]."),
    actors: Optional[int] = typer.Option(None, help="Model actors [default: one per GPU, else 1]."),
    gpus_per_actor: Optional[float] = typer.Option(None, help="GPUs per actor [default: 1 where the cluster has GPUs, else 0]."),
    batch_size: Optional[int] = typer.Option(None, help="Images per model batch [default: 64 on GPU, 16 on CPU]."),
    max_error_fraction: Optional[float] = typer.Option(None, help="Above this fraction of failed inputs, exit 3 [default: 0.05]."),
    max_pixels: Optional[int] = typer.Option(None, help="Refuse images with more pixels (decompression bombs) [default: 100000000]."),
    follow_symlinks: Optional[bool] = typer.Option(None, "--follow-symlinks", help="Allow symlinks that point outside the dataset root."),
    incremental: Optional[bool] = typer.Option(None, "--incremental", help="Skip images that already have a row for this model and these settings."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address [default: RAY_ADDRESS, else a new local cluster]."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Compute CAM heatmaps and boxes for every image of a dataset, as a Ray job."""
    _setup_logging(verbose)
    flags = dict(locals())
    for name in ("config", "verbose"):
        flags.pop(name)
    try:
        cfg = load_run_config(config, flags)
    except (ConfigError, yaml.YAMLError) as exc:
        raise _fail(str(exc), EXIT_USAGE)

    from camjobs.job import EXIT_FAILED, run_job

    try:
        result = run_job(cfg)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
        raise _fail(str(exc), EXIT_FAILED)
    typer.echo(f"run {result.run_id}: {result.message}")
    typer.echo(f"results: {cfg.output.rstrip('/')}/cams  errors: {cfg.output.rstrip('/')}/errors  summary: {result.summary_path}")
    if result.exit_code:
        raise _fail(result.message, result.exit_code)


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Folder to write the synthetic dataset into."),
    layout: str = typer.Option("ham10000", help="Only ham10000 is generated."),
    n: int = typer.Option(300, "--n", help="Number of images."),
    seed: int = typer.Option(0, help="Random seed: same seed, same dataset."),
) -> None:
    """Generate a synthetic dermoscopy dataset in the real HAM10000 layout."""
    _setup_logging(False)
    from camjobs.synth import synth_dataset

    try:
        summary = synth_dataset(out, layout=layout, n=n, seed=seed, progress=True)
    except ValueError as exc:
        raise _fail(str(exc), EXIT_USAGE)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(summary.class_counts.items()))
    typer.echo(f"{summary.n} images in {summary.out_dir} ({counts})")


@app.command()
def train(
    data: str = typer.Option(..., "--data", help="Dataset directory in any supported layout."),
    out: Path = typer.Option(..., "--out", help="Checkpoint file to write."),
    model: str = typer.Option("resnet18", help="torchvision architecture with a GAP -> linear head."),
    epochs: int = typer.Option(5, help="Training epochs."),
    input_size: int = typer.Option(224, help="Square input size."),
    batch_size: int = typer.Option(32, help="Batch size."),
    lr: float = typer.Option(1e-3, help="Learning rate (AdamW)."),
    layout: str = typer.Option("auto", help="Dataset layout [default: auto]."),
    weights: Optional[str] = typer.Option(None, help="'imagenet' or a local torchvision weights file to start from."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Fine-tune a torchvision GAP classifier and write a camjobs checkpoint."""
    _setup_logging(False)
    from camjobs.train import TrainConfig, train_model

    try:
        result = train_model(
            TrainConfig(
                data=data, out=str(out), arch=model, epochs=epochs, input_size=input_size,
                batch_size=batch_size, lr=lr, layout=layout, weights=weights, seed=seed,
            )
        )
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        raise _fail(str(exc), EXIT_FAILED)
    typer.echo(f"checkpoint: {result.checkpoint} (validation accuracy {result.val_accuracy:.1%})")


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


def main() -> None:
    app()
