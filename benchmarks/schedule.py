"""Ray Data's scheduling of the camjobs pipeline on a simulated 16-core GPU machine.

Whether a GPU machine's idle CPUs are Ray Data's scheduling can be measured without 16 cores:
each stage's CPU work is padded to the cost measured on that machine with a sleep, so that what
is timed is Ray Data's decisions (how many tasks run at once, backpressure, the object store
budget), not this machine's cores. The stages are camjobs' own, in camjobs' own pipeline
(`run_job` on a local cluster that claims --cpus CPUs and one GPU, its stages changed through
run_job's adapt argument):

  decode     camjobs' decode stage on small JPEGs (the 224 px arrays it returns are real),
             padded by a sleep to --decode-ms per image
  model      camjobs' predictor with its model step replaced by a sleep of batch / --model-rate
             (the rows, the 7x7 maps and the Arrow table are real)
  localize   camjobs' localize stage, padded by a sleep to --localize-ms per image; the Parquet
             sink is real

The default costs are the H200 machine's (results-gpu.md), all multiplied by --slowdown so that
Ray's own work stays small on 2 real cores; rates are reported in the machine's units (x
slowdown): from the first localized batch to the last, and the steady rate (harness.steady_rate).
The ideal is min(model rate, CPUs left beside the actor / (decode + localize ms)). Variants are
variants.parse_variant's names, joined with +.

    .venv/bin/python -m benchmarks.schedule --variants default,split16 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from benchmarks import datasets, harness, results
from benchmarks.variants import NAMES


def padded(stage, ms_per_image: float):
    """`stage`, made to take at least ms_per_image per row: the rest of its time is a sleep."""

    def run(batch, **kwargs):
        start = time.perf_counter()
        out = stage(batch, **kwargs)
        rows = batch.num_rows if hasattr(batch, "num_rows") else len(batch["image_id"])
        time.sleep(max(0.0, rows * ms_per_image / 1000 - (time.perf_counter() - start)))
        return out

    run.__name__ = f"sim_{stage.__name__}"
    return run


def simulated(predictor: type, model_rate: float) -> type:
    """The predictor class with its model step a sleep of batch / model_rate (a GPU's forward)."""
    return type(f"Sim{predictor.__name__}", (predictor,), {"_extract": _sleeping_extract, "model_rate": model_rate})


def _sleeping_extract(self, pixels, targets):
    import torch

    from camjobs.cam.core import CAMResult

    count = len(pixels)
    time.sleep(count / self.model_rate)
    target = torch.zeros(count, dtype=torch.long) if targets is None else targets.clamp(min=0)
    return CAMResult(torch.zeros(count, len(self.classes)), target, torch.rand(count, 7, 7))


def worker(args) -> None:
    import ray

    from benchmarks.variants import init_local_ray, parse_variant, run_variant  # imports Ray
    from camjobs.config import RunConfig

    slow = args.slowdown
    init_local_ray(args.cpus, 1)
    out = Path(args.scratch) / args.worker
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    change = {
        "decode": lambda fn: padded(fn, args.decode_ms * slow),
        "predict": lambda cls: simulated(cls, args.model_rate / slow),
        "localize": lambda fn: padded(fn, args.localize_ms * slow),
    }
    cfg = RunConfig(
        data=args.data, output=str(out / "output"), model="resnet18", classes=["mel", "nv", "bkl"], input_size=224
    )
    started = time.time()
    result = run_variant(cfg, parse_variant(args.worker), str(out / "stages.jsonl"), change)
    wall = time.time() - started
    figures = harness.stage_figures(harness.read_log(out / "stages.jsonl"), started)
    ray.shutdown()
    shutil.rmtree(out / "output", ignore_errors=True)
    harness.emit(
        {
            "variant": args.worker,
            "images": result.summary["counts"]["inputs"],
            "processed": result.summary["counts"]["processed"],
            "wall_s": round(wall, 1),
            "after_first_images_per_s": harness.rounded((figures["after_first_images_per_s"] or 0) * slow, 1),
            "steady_images_per_s": harness.rounded((figures["steady_images_per_s"] or 0) * slow, 1),
            "running": {kind: figures[kind].get("at_once") for kind in ("decode", "localize")},
            "plan": result.summary["actors"],
        }
    )


def render(args, facts: dict, rows: list[dict], ideal: float) -> str:
    lines = [
        f"## {harness.utc_now()}: Ray Data's scheduling on a simulated {args.cpus}-CPU GPU machine "
        "(benchmarks/schedule.py)",
        "",
        f"- Command: `{' '.join(['.venv/bin/python -m benchmarks.schedule'] + sys.argv[1:])}`",
        *harness.machine_lines(facts),
        f"- {args.images} images; decode {args.decode_ms} ms, localize {args.localize_ms} ms per image, model "
        f"{args.model_rate:g} images/s, slowdown {args.slowdown:g}: ideal {ideal:.0f} images/s",
        "",
        "| round | variant | wall s | after the first batch, images/s | steady, images/s | x ideal (steady) "
        "| decode / localize tasks at once |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['round']} | {r['variant']} | {r['wall_s']} | {r['after_first_images_per_s']} | "
            f"{r['steady_images_per_s']} | {(r['steady_images_per_s'] or 0) / ideal:.2f} | "
            f"{r['running']['decode']} / {r['running']['localize']} |"
        )
    return "\n".join(lines) + "\n"


def main(args) -> None:
    data = datasets.tiny_jpegs(Path(args.data), args.images)
    # the GPU actor reserves one CPU
    ideal = min(args.model_rate, (args.cpus - 1) / (args.decode_ms + args.localize_ms) * 1000)
    print(f"{args.images} images; {args.cpus} CPUs + 1 GPU simulated; ideal {ideal:.0f} images/s", flush=True)
    rows, variants = [], args.variants.split(",")
    passed = [
        "--data",
        str(data),
        "--cpus",
        str(args.cpus),
        "--decode-ms",
        str(args.decode_ms),
        "--localize-ms",
        str(args.localize_ms),
        "--model-rate",
        str(args.model_rate),
        "--slowdown",
        str(args.slowdown),
        "--scratch",
        args.scratch,
    ]
    for round_number in range(args.rounds):
        for variant in variants if round_number % 2 == 0 else reversed(variants):
            log = Path(args.scratch) / "logs" / f"{variant}-{round_number + 1}.log"
            r = harness.run_child("schedule", ["--worker", variant, *passed], log)
            rows.append({**r, "round": round_number + 1, "ideal_images_per_s": round(ideal, 1)})
            print(
                f"round {round_number + 1} {variant:15s} {r['wall_s']:6.1f} s  after the first batch "
                f"{r['after_first_images_per_s']}  steady {r['steady_images_per_s']} images/s "
                f"({(r['steady_images_per_s'] or 0) / ideal:.2f} x ideal); tasks at once {r['running']}",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.results:
        facts = harness.machine_facts()
        marker = results.round_marker("schedule.py", facts, f"{args.cpus} CPUs + 1 GPU simulated")
        results.publish(args.results, render(args, facts, rows, ideal), marker, "camjobs CPU throughput")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.schedule", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="/tmp/camjobs-schedule-data")
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--variants", default="default", help=f"comma list of: {NAMES}")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--cpus", type=int, default=16, help="logical CPUs the simulated node claims")
    parser.add_argument("--decode-ms", type=float, default=2.47)
    parser.add_argument("--localize-ms", type=float, default=3.31)
    parser.add_argument("--model-rate", type=float, default=10000.0, help="images/s of the model step")
    parser.add_argument("--slowdown", type=float, default=4.0)
    parser.add_argument("--scratch", default="/tmp/camjobs-schedule-bench")
    parser.add_argument("--json", default=None)
    parser.add_argument("--results", default="", help="Markdown results file to write a section to (default: none)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    parsed = parse_args()
    worker(parsed) if parsed.worker else main(parsed)
