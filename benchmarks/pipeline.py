"""Ray Data scheduling of the camjobs pipeline on a simulated GPU node, on CPUs only.

A local Ray cluster that claims --cpus logical CPUs and 1 logical GPU, so that camjobs plans a GPU
actor (batch 256, one actor, 1 CPU) while the model really runs on a CPU, made cheap (resnet18 at
32 px) so that, as on a real GPU machine, the CPU stages (decode, localize, PNG, write) are the
limit. Each variant (variants.parse_variant's names) runs in a fresh process, rounds alternated,
and reports wall time and the steady rate (harness.steady_rate). Unlike schedule.py, the stages
do their real work, so on few cores this measures the cores as much as Ray Data's decisions.

    .venv/bin/python -m benchmarks.pipeline --data DIR --variants default,decode8 --rounds 2

DIR is a dataset in any camjobs layout (e.g. `camjobs synth DIR --n 8192`; 600x450 JPEGs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from benchmarks import harness, results
from benchmarks.variants import NAMES


def worker(args) -> None:
    import ray

    from benchmarks.variants import init_local_ray, parse_variant, run_variant
    from camjobs.config import RunConfig

    init_local_ray(args.cpus, 1)
    out = Path(args.scratch) / args.worker
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg = RunConfig(
        data=args.data,
        output=str(out / "output"),
        model="resnet18",
        classes=["mel", "nv", "bkl"],
        input_size=32,
        batch_size=256,
    )
    started = time.time()
    result = run_variant(cfg, parse_variant(args.worker), str(out / "stages.jsonl"))
    wall = time.time() - started
    figures = harness.stage_figures(harness.read_log(out / "stages.jsonl"), started)
    ray.shutdown()
    shutil.rmtree(out / "output", ignore_errors=True)
    images = result.summary["counts"]["inputs"]
    harness.emit(
        {
            "variant": args.worker,
            "images": images,
            "wall_s": round(wall, 1),
            "images_per_s": round(images / wall, 1),
            "steady_images_per_s": figures["steady_images_per_s"],
            "plan": result.summary["actors"],
        }
    )


def render(args, facts: dict, rows: list[dict]) -> str:
    lines = [
        f"## {harness.utc_now()}: a simulated GPU node with {args.cpus} logical CPUs (benchmarks/pipeline.py)",
        "",
        f"- Command: `{' '.join(['.venv/bin/python -m benchmarks.pipeline'] + sys.argv[1:])}`",
        *harness.machine_lines(facts),
        "",
        "| round | variant | wall s | images/s | steady images/s |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['round']} | {r['variant']} | {r['wall_s']} | {r['images_per_s']} | {r['steady_images_per_s']} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def main(args) -> None:
    rows, variants = [], args.variants.split(",")
    for round_number in range(args.rounds):
        for variant in variants if round_number % 2 == 0 else reversed(variants):
            log = Path(args.scratch) / "logs" / f"{variant}-{round_number + 1}.log"
            argv = ["--worker", variant, "--data", args.data, "--cpus", str(args.cpus), "--scratch", args.scratch]
            r = harness.run_child("pipeline", argv, log)
            rows.append({**r, "round": round_number + 1})
            print(
                f"round {round_number + 1} {variant:13s} {r['wall_s']:6.1f} s  {r['images_per_s']:6.1f} images/s  "
                f"steady {r['steady_images_per_s']} images/s",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.results:
        facts = harness.machine_facts()
        marker = results.round_marker("pipeline.py", facts, f"{args.cpus} CPUs + 1 GPU simulated")
        results.publish(args.results, render(args, facts, rows), marker, "camjobs CPU throughput")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--variants", default="default,decode8", help=f"comma list of: {NAMES}")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=8, help="logical CPUs the simulated node claims")
    parser.add_argument("--scratch", default="/tmp/camjobs-pipeline-bench")
    parser.add_argument("--json", default=None)
    parser.add_argument("--results", default="", help="Markdown results file to write a section to (default: none)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    parsed = parse_args()
    worker(parsed) if parsed.worker else main(parsed)
