"""Ray Data scheduling of the camjobs pipeline on a simulated GPU node, on CPUs only.

A local Ray cluster that claims --cpus logical CPUs and 1 logical GPU, so that camjobs plans a GPU
actor (batch 256, one actor, 1 CPU) while the model really runs on a CPU, made cheap (resnet18 at
32 px) so that, as on a real GPU machine, the CPU stages (decode, localize, PNG, write) are the
limit. Each variant runs in a fresh process, alternating, and reports wall time and the steady
rate (localize batches between the first and the last quarter). Variants:

  default      the job as it is
  decode8      8 images per decode task (GPU plans use 32)
  halfcpu      decode and localize tasks reserve half a CPU each (the default is 1)
  noreserve    Ray Data's per-operator resource reservation off
  nodownstream Ray Data's downstream-capacity backpressure off
  split16      the actor's blocks split into 16-row blocks before the localize stage (until 11-26)

    .venv/bin/python benchmarks/pipeline.py --data DIR --variants default,decode8 --rounds 2

DIR is a dataset in any camjobs layout (e.g. `camjobs synth DIR --n 8192`; 600x450 JPEGs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ("default", "decode8", "halfcpu", "noreserve", "nodownstream", "split16")


def worker(args) -> None:
    import ray

    sys.path.insert(0, str(HERE))
    import bench  # its timed stage wrapper logs each localize batch
    import schedule

    from camjobs.config import RunConfig

    job = schedule.start_simulated_gpu_node(args.cpus, {"decode8": "decoderows8"}.get(args.worker, args.worker))
    out = Path(args.scratch) / args.worker
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    stage_log = out / "localize.jsonl"
    job.localize_batch = bench.timed_localize(str(stage_log))
    started = time.time()
    result = job.run_job(RunConfig(data=args.data, output=str(out / "output"), model="resnet18",
                                   classes=["mel", "nv", "bkl"], input_size=32, batch_size=256))
    wall = time.time() - started
    batches = sorted((r["end"], r["n"]) for r in map(json.loads, stage_log.read_text().splitlines()))
    steady, _ = schedule.steady_rate(batches)
    print("PIPELINE " + json.dumps({
        "variant": args.worker, "images": result.summary["counts"]["inputs"], "wall_s": round(wall, 1),
        "images_per_s": round(result.summary["counts"]["inputs"] / wall, 1),
        "steady_images_per_s": steady and round(steady, 1), "plan": result.summary["actors"],
    }))
    ray.shutdown()
    shutil.rmtree(out / "output", ignore_errors=True)


def main(args) -> None:
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    results = []
    for round_number in range(args.rounds):
        for variant in variants if round_number % 2 == 0 else reversed(variants):
            command = [sys.executable, __file__, "--worker", variant, "--data", args.data,
                       "--cpus", str(args.cpus), "--scratch", args.scratch]
            done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, RAY_ADDRESS=""))
            line = next((l for l in done.stdout.splitlines() if l.startswith("PIPELINE ")), None)
            if line is None:
                sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(line.removeprefix("PIPELINE ")))
            print(f"round {round_number + 1} {variant:13s} {results[-1]['wall_s']:6.1f} s  "
                  f"{results[-1]['images_per_s']:6.1f} images/s  steady {results[-1]['steady_images_per_s']} images/s",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--variants", default="default,decode8")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=8, help="logical CPUs the simulated node claims")
    parser.add_argument("--scratch", default="/tmp/camjobs-pipeline-bench")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    worker(parsed) if parsed.worker else main(parsed)
