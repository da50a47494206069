"""Ray Data's scheduling of the camjobs pipeline on a simulated 16-core GPU machine.

On the H200 the job was CPU-bound while most of its 16 CPUs were idle: Ray Data ran few decode
tasks although hundreds of blocks waited. Whether that is Ray Data's scheduling can be measured
without 16 cores: each stage's CPU work is replaced by a sleep of the cost measured on that
machine, so that what is timed is Ray Data's decisions (how many tasks run at once, backpressure,
the object store budget), not this machine's cores. The stages are camjobs' own, in camjobs'
own pipeline (`camjobs.job.run_job`, its plan for a node with --cpus CPUs and one GPU):

  decode     camjobs' decode_batch on small JPEGs (the 224 px arrays it returns are real, 150 KB
             an image), padded by a sleep to --decode-ms per image
  model      CamPredictor with its model step replaced by a sleep of batch / --model-rate (the
             rows, the 7x7 maps and the Arrow table are real)
  localize   camjobs' localize_batch, padded by a sleep to --localize-ms per image; the Parquet
             sink is real

The default costs are the H200 machine's (results-gpu.md: decode 2.47 ms, localize 2.23 + PNG
1.08 ms per image on one core), all multiplied by --slowdown (default 4) so that Ray's own work
stays small on 2 real cores; rates are reported in the machine's units (x slowdown): from the
first localized batch to the last, and steady (localize batches between the first and the last
quarter). The ideal is min(model rate, CPUs left beside the actor / (decode + localize ms)).
Variants (joined with +): splitN, gpubatchN, decoderowsN, halfcpu, reserveP, noreserve, nodownstream (apply_variant).

    .venv/bin/python benchmarks/schedule.py --variants default,split16 --rounds 2
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def make_data(folder: Path, images: int) -> None:
    """`images` small JPEGs (64x48) in the HAM10000 layout; real files, cheap to decode."""
    import cv2

    if (folder / "HAM10000_metadata.csv").exists():
        return
    part = folder / "HAM10000_images_part_1"
    part.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(folder / "HAM10000_metadata.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"])
        for i in range(images):
            image_id = f"ISIC_{i:07d}"
            pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            cv2.imwrite(str(part / f"{image_id}.jpg"), pixels)
            writer.writerow([f"HAM_{i:07d}", image_id, ("mel", "nv", "bkl")[i % 3], "histo", 50, "male", "back"])


def padded(stage, ms_per_image: float):
    """`stage`, made to take at least ms_per_image per row: the rest of its time is a sleep."""

    def run(batch, **kwargs):
        start = time.perf_counter()
        out = stage(batch, **kwargs)
        rows = len(batch["image_id"]) if isinstance(batch, dict) else batch.num_rows
        time.sleep(max(0.0, rows * ms_per_image / 1000 - (time.perf_counter() - start)))
        return out

    run.__name__ = f"sim_{stage.__name__}"
    return run


def sim_predictor(model_rate: float):
    """CamPredictor whose model step is a sleep of batch / model_rate (a GPU's forward)."""
    from camjobs.predictor import CamPredictor

    # Built at module level by type() so that cloudpickle sends it by value without torch in it.
    return type("SimPredictor", (CamPredictor,), {"_extract": _sleeping_extract, "model_rate": model_rate})


def _sleeping_extract(self, pixels, targets):
    import torch

    from camjobs.cam.core import CAMResult

    count = len(pixels)
    time.sleep(count / self.model_rate)
    target = torch.zeros(count, dtype=torch.long) if targets is None else targets.clamp(min=0)
    return CAMResult(torch.zeros(count, len(self.classes)), target, torch.rand(count, 7, 7))


def split_before_localize(rows: int) -> None:
    """camjobs' pipeline as it was: repartition() between the model actor and the localize stage."""
    import ray.data

    map_batches = ray.data.Dataset.map_batches

    def with_split(self, fn, *args, **kwargs):
        if getattr(fn, "__name__", "").endswith("localize_batch"):
            self = self.repartition(target_num_rows_per_block=rows)
        return map_batches(self, fn, *args, **kwargs)

    ray.data.Dataset.map_batches = with_split


def steady_rate(batches: list[tuple[float, int]]) -> tuple[float | None, list[tuple[float, int]]]:
    """Images per second over the localize batches (end, rows) between the first and the last
    quarter, and those batches; None where there are too few."""
    quarter = len(batches) // 4
    middle = batches[quarter:len(batches) - quarter]
    return (sum(n for _, n in middle[1:]) / (middle[-1][0] - middle[0][0]) if len(middle) > 1 else None), middle


def apply_variant(change: str, job, context) -> None:
    if change.startswith("reserve"):  # reserve75: 75% of the resources reserved per operator
        context.op_resource_reservation_ratio = int(change.removeprefix("reserve")) / 100
    elif change == "noreserve":
        context.op_resource_reservation_enabled = False
    elif change == "nodownstream":
        context.downstream_capacity_backpressure_ratio = None
    elif change == "halfcpu":  # decode and localize tasks reserve half a CPU (the default until 11-26)
        job.STAGE_CPUS = 0.5
    elif change.startswith("gpubatch"):  # gpubatch64: the GPU actor's batch at 224 px (default 256)
        job.DEFAULT_GPU_BATCH = int(change.removeprefix("gpubatch"))
    elif change.startswith("decoderows"):  # decoderows64: rows per decode task
        job.GPU_DECODE_ROWS = int(change.removeprefix("decoderows"))
    elif change.startswith("split"):  # split16: the actor's blocks split to 16 rows for localize (until 11-26)
        split_before_localize(int(change.removeprefix("split")))
    elif change != "default":
        sys.exit(f"unknown variant {change}")


def start_simulated_gpu_node(cpus: int, variant: str):
    """A local cluster that claims `cpus` CPUs and one GPU, with the variant applied; camjobs.job."""
    import ray

    ray.init(address="local", num_cpus=cpus, num_gpus=1, include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=False)
    import camjobs.job as job

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    # Ray Data logs each operator's budget and queues every few seconds at DEBUG, in ray-data.log.
    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.DEBUG)
    for change in variant.split("+"):  # e.g. split16+decoderows64
        apply_variant(change, job, context)
    return job


def worker(args) -> None:
    import ray

    sys.path.insert(0, str(HERE))
    import bench  # its timed stage wrapper logs each localize batch

    from camjobs.config import RunConfig
    from camjobs.decode import decode_batch
    from camjobs.localize import localize_batch

    variant = args.worker
    job = start_simulated_gpu_node(args.cpus, variant)
    slow = args.slowdown
    out = Path(args.scratch) / variant
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    stage_log = out / "stages.jsonl"
    job.decode_batch = bench.timed_stage(str(stage_log), "decode", padded(decode_batch, args.decode_ms * slow))
    job.localize_batch = bench.timed_stage(str(stage_log), "localize", padded(localize_batch, args.localize_ms * slow))
    job.CamPredictor = sim_predictor(args.model_rate / slow)
    started = time.time()
    result = job.run_job(RunConfig(data=args.data, output=str(out / "output"), model="resnet18",
                                   classes=["mel", "nv", "bkl"], input_size=224))
    wall = time.time() - started
    records = [json.loads(line) for line in stage_log.read_text().splitlines()]
    batches = sorted((r["end"], r["n"]) for r in records if r["kind"] == "localize")
    steady, middle = steady_rate(batches)
    # From the first localized batch to the last: the model actor's start-up left out, the tail kept.
    after_first = sum(n for _, n in batches[1:]) / (batches[-1][0] - batches[0][0]) if len(batches) > 1 else None
    # Tasks running at once, on average over the steady window: time busy in it / its length.
    window = (middle[0][0], middle[-1][0]) if len(middle) > 1 else (0.0, 1.0)
    running = {kind: round(sum(max(0.0, min(r["end"], window[1]) - max(r["start"], window[0]))
                                for r in records if r["kind"] == kind) / (window[1] - window[0]), 2)
               for kind in ("decode", "localize")}
    images = result.summary["counts"]["inputs"]
    print("SCHEDULE " + json.dumps({
        "variant": variant, "images": images, "processed": result.summary["counts"]["processed"],
        "wall_s": round(wall, 1),
        "after_first_images_per_s": after_first and round(after_first * slow, 1),
        "steady_images_per_s": steady and round(steady * slow, 1), "running": running,
        "plan": result.summary["actors"],
    }))
    ray.shutdown()
    shutil.rmtree(out / "output", ignore_errors=True)


def main(args) -> None:
    make_data(Path(args.data), args.images)
    cpus_left = args.cpus - 1  # the GPU actor reserves one
    ideal = min(args.model_rate, cpus_left / (args.decode_ms + args.localize_ms) * 1000)
    print(f"{args.images} images; {args.cpus} CPUs + 1 GPU simulated; decode {args.decode_ms} ms, "
          f"localize {args.localize_ms} ms per image, model {args.model_rate:g} images/s, slowdown {args.slowdown:g}: "
          f"ideal {ideal:.0f} images/s", flush=True)
    results = []
    variants = args.variants.split(",")
    for round_number in range(args.rounds):
        for variant in variants if round_number % 2 == 0 else reversed(variants):
            command = [sys.executable, __file__, "--worker", variant] + [
                f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items()
                if name not in ("worker", "variants", "rounds", "json") and value is not None]
            done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, RAY_ADDRESS=""))
            line = next((l for l in done.stdout.splitlines() if l.startswith("SCHEDULE ")), None)
            if line is None:
                sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
            result = json.loads(line.removeprefix("SCHEDULE "))
            result.update(round=round_number + 1, ideal_images_per_s=round(ideal, 1))
            results.append(result)
            print(f"round {round_number + 1} {variant:15s} {result['wall_s']:6.1f} s  "
                  f"after the first batch {result['after_first_images_per_s']}  "
                  f"steady {result['steady_images_per_s']} images/s "
                  f"({(result['steady_images_per_s'] or 0) / ideal:.2f} x ideal); tasks at once {result['running']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="/tmp/camjobs-schedule-data")
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--variants", default="default")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--cpus", type=int, default=16, help="logical CPUs the simulated node claims")
    parser.add_argument("--decode-ms", type=float, default=2.47)
    parser.add_argument("--localize-ms", type=float, default=3.31)
    parser.add_argument("--model-rate", type=float, default=10000.0, help="images/s of the model step")
    parser.add_argument("--slowdown", type=float, default=4.0)
    parser.add_argument("--scratch", default="/tmp/camjobs-schedule-bench")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    worker(parsed) if parsed.worker else main(parsed)
