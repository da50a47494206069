"""`camjobs demo`: synth -> train -> Ray job -> summary, on a laptop with no GPU and no internet."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from camjobs.config import RunConfig
from camjobs.evaluate import box_iou, centre_box, mask_box, read_mask
from camjobs.job import run_job
from camjobs.layouts import list_images
from camjobs.synth import synth_dataset
from camjobs.train import TrainConfig, train_model

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
    mean_iou: float  # first CAM box against the mask's box
    centre_iou: float  # centre-box baseline against the mask's box


def first_box_ious(cams: pd.DataFrame, mask_paths: dict[str, str]) -> tuple[list[float], list[float]]:
    """IoU with each image's mask box, for boxes[0] and for the centre-box baseline."""
    cam_ious, centre_ious = [], []
    for row in cams.itertuples():
        truth = mask_box(read_mask(mask_paths[row.image_id])) if row.image_id in mask_paths else None
        if truth is None:
            continue
        boxes = list(row.boxes) if row.boxes is not None else []
        first = boxes[0] if boxes else None
        cam_ious.append(box_iou((first["x_min"], first["y_min"], first["x_max"], first["y_max"]), truth) if first else 0.0)
        centre_ious.append(box_iou(centre_box(row.width, row.height), truth))
    return cam_ious, centre_ious


def run_demo(output: Path, *, n: int = 240, epochs: int = DEMO_EPOCHS, seed: int = 0, echo: Callable[[str], None] = print) -> DemoResult:
    output = Path(output)
    data, checkpoint, results = output / "data", output / "model.pt", output / "results"
    started = time.time()
    if not (data / "HAM10000_metadata.csv").exists():
        echo(f"1/4 synthesizing {n} dermoscopy images in the HAM10000 layout -> {data}")
        synth_dataset(data, n=n, seed=seed, progress=True)
    else:
        echo(f"1/4 reusing the synthetic dataset in {data}")

    echo(f"2/4 training {DEMO_ARCH} at {DEMO_INPUT_SIZE} px for {epochs} epochs on the CPU")
    trained = train_model(
        TrainConfig(
            data=str(data), out=str(checkpoint), arch=DEMO_ARCH, epochs=epochs, input_size=DEMO_INPUT_SIZE,
            batch_size=32, lr=3e-3, seed=seed,
        )
    )
    echo(f"    validation accuracy {trained.val_accuracy:.1%}, {time.time() - started:.0f} s so far")

    echo("3/4 running the Ray job (local cluster)")
    result = run_job(RunConfig(data=str(data), output=str(results), checkpoint=str(checkpoint)))
    cams_dir = results / "cams" / result.run_id
    cams = pd.read_parquet(cams_dir, columns=["image_id", "width", "height", "boxes"])

    echo("4/4 comparing first boxes with the synthetic lesion masks")
    masks = {r.image_id: r.mask_path for r in list_images(str(data)).records if r.mask_path}
    cam_ious, centre_ious = first_box_ious(cams, masks)
    mean_iou = sum(cam_ious) / len(cam_ious) if cam_ious else float("nan")
    centre_iou = sum(centre_ious) / len(centre_ious) if centre_ious else float("nan")
    counts = result.summary["counts"]
    echo("")
    echo(f"run {result.run_id}: {counts['processed']} rows, {counts['errors']} errors, {time.time() - started:.0f} s in all")
    echo(f"Parquet: {results / 'cams'}  (pandas.read_parquet works on it)")
    echo(f"mean IoU of the first CAM box with the mask box: {mean_iou:.3f}")
    echo(f"mean IoU of the centre-box baseline:              {centre_iou:.3f}")
    return DemoResult(result.exit_code, cams_dir, counts["processed"], counts["errors"], trained.val_accuracy, mean_iou, centre_iou)
