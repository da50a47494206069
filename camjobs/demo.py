"""`camjobs demo`: synth -> train -> Ray job (with --refine) -> evaluate -> gallery, on a laptop
with no GPU and no internet."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from camjobs.config import RunConfig
from camjobs.labels.evaluate import evaluate_output
from camjobs.labels.viz import render_gallery
from camjobs.models.train import TrainConfig, train_model
from camjobs.pipeline.job import run_job
from camjobs.synth import synth_dataset

DEMO_ARCH = "shufflenet_v2_x1_0"
DEMO_INPUT_SIZE = 224
# A fixed epoch count, not a time budget: the same data and seed give the same model on any
# machine, however loaded. About a minute on 2 CPU cores.
DEMO_EPOCHS = 12


@dataclass
class DemoResult:
    exit_code: int
    cams_dir: Path
    rows: int
    errors: int
    val_accuracy: float
    metrics: dict  # camjobs evaluate's metrics.json, in percent
    index_html: str


def run_demo(
    output: Path, *, n: int = 240, epochs: int = DEMO_EPOCHS, seed: int = 0, echo: Callable[[str], None] = print
) -> DemoResult:
    output = Path(output)
    data, checkpoint, results = output / "data", output / "model.pt", output / "results"
    started = time.time()
    if not (data / "HAM10000_metadata.csv").exists():
        echo(f"1/5 synthesizing {n} dermoscopy images in the HAM10000 layout -> {data}")
        synth_dataset(data, n=n, seed=seed, progress=True)
    else:
        echo(f"1/5 reusing the synthetic dataset in {data}")

    echo(f"2/5 training {DEMO_ARCH} at {DEMO_INPUT_SIZE} px for {epochs} epochs on the CPU")
    trained = train_model(
        TrainConfig(
            data=str(data),
            out=str(checkpoint),
            arch=DEMO_ARCH,
            epochs=epochs,
            input_size=DEMO_INPUT_SIZE,
            batch_size=32,
            lr=3e-3,
            seed=seed,
        )
    )
    echo(f"    validation accuracy {trained.val_accuracy:.1%}, {time.time() - started:.0f} s so far")

    echo("3/5 running the Ray job (local cluster)")
    # --overwrite: a demo run again in the same folder replaces the last one's rows
    result = run_job(
        RunConfig(data=str(data), output=str(results), checkpoint=str(checkpoint), refine=True, overwrite=True)
    )

    echo("4/5 evaluating the maps and boxes against the synthetic lesion masks")
    report = evaluate_output(str(results), data=str(data), run_id=result.run_id)
    metrics = report.metrics

    echo("5/5 drawing the gallery")
    gallery = render_gallery(str(results), output / "gallery", data=str(data), limit=48, sort="worst")

    counts = result.summary["counts"]
    echo("")
    echo(report.table())
    echo("")
    echo(
        f"run {result.run_id}: {counts['processed']} rows, {counts['errors']} errors, {time.time() - started:.0f} s "
        "in all"
    )
    echo(f"Parquet: {results / 'cams'}  (pandas.read_parquet works on it)")
    echo(f"mean IoU of the first CAM box with the mask box: {metrics['mean_iou'] / 100:.3f}")
    echo(f"mean IoU of the first refined box (--refine):    {metrics['refined']['mean_iou'] / 100:.3f}")
    echo(f"mean IoU of the Otsu lesion baseline:            {metrics['otsu_baseline']['mean_iou'] / 100:.3f}")
    echo(f"mean IoU of the centre-box baseline:              {metrics['centre_baseline']['mean_iou'] / 100:.3f}")
    echo(f"report: {report.report_dir}")
    echo(f"gallery: {gallery.index_html}")
    return DemoResult(
        result.exit_code,
        results / "cams" / result.run_id,
        counts["processed"],
        counts["errors"],
        trained.val_accuracy,
        metrics,
        gallery.index_html,
    )
