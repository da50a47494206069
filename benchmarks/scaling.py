"""Actor-pool scaling of `camjobs run` on a simulated cluster: 2 model actors against 1.

A `ray.cluster_utils.Cluster` on this machine: a head (CPUs only, for the read/decode and write
tasks) and 2 worker nodes with 1 CPU and 1 logical GPU each. No real GPU is used: the actors see
a GPU resource but torch finds no CUDA device and runs on the CPU with the 1 thread Ray gives a
1-CPU actor. The job runs with `--gpus-per-actor 1` and `--actors 1`, then `--actors 2`, each in a
fresh process with its own fresh cluster, and the result is reported as

    efficiency = rate(2 actors) / (2 * rate(1 actor))

both end to end (run_job, Ray start-up excluded: the cluster is up before) and at the steady rate
(harness.steady_rate). On a machine with 2 physical cores the 2 actors share those cores with the
decode tasks, the raylets and anything else running, so the efficiency says more about the
machine than about camjobs; the per-actor rate (images / time inside __call__) shows how much each
actor slowed down.

    .venv/bin/python -m benchmarks.scaling --images 256 --model resnet50 --input-size 224
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import datasets, harness, results
from benchmarks.bench import TITLE, add_common_args, child_args


def worker(args) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from benchmarks.variants import run_variant
    from camjobs.config import RunConfig

    out = Path(args.scratch) / f"scaling-{args.worker_actors}-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log_path = str(out / "stages.jsonl")
    os.environ.pop("RAY_ADDRESS", None)
    started = time.time()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.head_cpus, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    cluster_ready = time.time()
    try:
        cfg = RunConfig(
            data=args.data,
            output=str(out / "output"),
            model=args.model,
            classes=args.classes.split(","),
            input_size=args.input_size,
            actors=args.worker_actors,
            gpus_per_actor=1.0,
            batch_size=args.batch_size,
            address=cluster.address,
        )
        load_start, run_started = os.getloadavg()[0], time.time()
        result = run_variant(cfg, log_path=log_path)
        run_finished = time.time()
    finally:
        ray.shutdown()
        cluster.shutdown()
    records = harness.read_log(log_path)
    images = result.summary["counts"]["inputs"]
    shutil.rmtree(out / "output", ignore_errors=True)
    harness.emit(
        {
            "actors": args.worker_actors,
            "images": images,
            "processed": result.summary["counts"]["processed"],
            "rows_per_node": result.summary["rows_per_node"],
            "plan": result.summary["actors"],
            "cluster_start_s": cluster_ready - started,
            "run_job_s": run_finished - run_started,
            "e2e_images_per_s": images / (run_finished - run_started),
            "pipeline_images_per_s": result.summary["throughput"]["pipeline_images_per_s"],
            **harness.stage_figures(records, run_started),
            "per_actor": per_actor(records),
            "load_start": load_start,
            "load_end": os.getloadavg()[0],
        }
    )


def per_actor(records: list[dict]) -> list[dict]:
    """Each model actor's images, batches, busy seconds and images per busy second."""
    actors: dict[int, dict] = {}
    for r in (r for r in records if r["kind"] == "predict"):
        a = actors.setdefault(r["pid"], {"images": 0, "batches": 0, "busy_s": 0.0})
        a["images"] += r["n"]
        a["batches"] += 1
        a["busy_s"] += r["end"] - r["start"]
    return [
        {**a, "busy_s": round(a["busy_s"], 2), "images_per_busy_s": round(a["images"] / a["busy_s"], 3)}
        for a in actors.values()
    ]


def render(args, facts: dict, runs: dict[int, list[dict]], loads: list[float]) -> str:
    def median(actors: int, key: str) -> float:
        return statistics.median(r[key] or 0.0 for r in runs[actors])

    e2e = median(2, "e2e_images_per_s") / (2 * median(1, "e2e_images_per_s"))
    steady = median(2, "steady_images_per_s") / (2 * median(1, "steady_images_per_s") or 1)
    command = " ".join([".venv/bin/python -m benchmarks.scaling"] + sys.argv[1:])
    lines = [
        f"## {harness.utc_now()}: scaling, {args.model} at {args.input_size} px, {args.images} images, "
        "simulated cluster",
        "",
        f"- Command: `{command}`",
        *harness.machine_lines(facts),
        f"- Cluster: head {args.head_cpus} CPUs (decode and write tasks), 2 nodes x (1 CPU, 1 logical GPU); all on "
        f"these {facts['cores']} cores; `--gpus-per-actor 1 --batch-size {args.batch_size}`; torch on the CPU, "
        "1 thread per actor",
        f"- 1-minute load average during the run: min {min(loads):.2f}, mean {statistics.mean(loads):.2f},"
        f" max {max(loads):.2f}" + (f"; {args.rounds} rounds, medians" if args.rounds > 1 else ""),
        "",
        "| actors | run_job s | end to end img/s | steady img/s | per-actor img/s (busy time) | rows per node "
        "| load start/end |",
        "| ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for actors in (1, 2):
        for r in runs[actors]:
            per = ", ".join(str(a["images_per_busy_s"]) for a in r["per_actor"])
            nodes = ", ".join(str(v) for v in r["rows_per_node"].values())
            lines.append(
                f"| {actors} | {r['run_job_s']:.1f} | {r['e2e_images_per_s']:.2f} | "
                f"{r['steady_images_per_s'] or 0:.2f} | {per} | {nodes} | "
                f"{r['load_start']:.1f}/{r['load_end']:.1f} |"
            )
    lines += ["", f"Efficiency rate2 / (2 x rate1): end to end **{e2e:.2f}**, steady rate **{steady:.2f}**."]
    return "\n".join(lines) + "\n"


def main(args) -> None:
    data = datasets.ham10000(Path(args.data_dir), args.images, width=args.width, height=args.height)
    Path(args.scratch).mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="scaling-logs-", dir=args.scratch))
    facts = harness.machine_facts()
    loads = harness.LoadSampler()
    loads.start()
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for round_index in range(args.rounds):
        for actors in (1, 2) if round_index % 2 == 0 else (2, 1):
            print(f"scaling: round {round_index + 1}/{args.rounds}, {actors} actor(s) ...", flush=True)
            extra = [
                "--worker-actors",
                str(actors),
                "--data",
                str(data),
                "--batch-size",
                str(args.batch_size),
                "--head-cpus",
                str(args.head_cpus),
            ]
            log = log_dir / f"scaling-{actors}-{int(time.time())}.log"
            r = harness.run_child("scaling", child_args(args) + extra, log)
            runs[actors].append(r)
            print(
                f"scaling:   run_job {r['run_job_s']:.1f} s, {r['e2e_images_per_s']:.2f} img/s end to end, steady "
                f"{r['steady_images_per_s'] or 0:.2f} img/s, per actor "
                f"{[a['images_per_busy_s'] for a in r['per_actor']]}, load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
    load_values = loads.stop()
    section = render(args, facts, runs, load_values)
    print("\n" + section)
    results.publish(args.results, section, results.round_marker("scaling.py", facts), TITLE)
    if args.json:
        raw = {"runs": runs, "machine": facts, "loads": load_values}
        Path(args.json).write_text(json.dumps(raw, indent=1, default=str))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0])
    add_common_args(p, images=256)
    p.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="--batch-size of the job (its GPU default leaves few batches per actor)",
    )
    p.add_argument("--head-cpus", type=int, default=2, help="logical CPUs of the head node (decode and write tasks)")
    p.add_argument("--rounds", type=int, default=1, help="1 then 2 actors, then 2 then 1, ... (medians reported)")
    p.add_argument("--worker-actors", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    worker(arguments) if arguments.worker_actors else main(arguments)
