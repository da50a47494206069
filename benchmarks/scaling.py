"""Actor-pool scaling of `camjobs run` on a simulated cluster: 2 model actors against 1.

A `ray.cluster_utils.Cluster` on this machine: a head (CPUs only, for the read/decode and write
tasks) and 2 worker nodes with 1 CPU and 1 logical GPU each. No real GPU is used: the actors see
a GPU resource but torch finds no CUDA device and runs on the CPU with the 1 thread Ray gives a
1-CPU actor. The job runs with `--gpus-per-actor 1` and `--actors 1`, then `--actors 2`, each in a
fresh process with its own fresh cluster, and the result is reported as

    efficiency = rate(2 actors) / (2 * rate(1 actor))

both end to end (run_job, Ray start-up excluded: the cluster is up before) and in the steady state
(from the moment every actor has finished its first batch to the last batch). On a machine with
2 physical cores the 2 actors share those cores with the decode tasks, the raylets and anything
else running, so the efficiency says more about the machine than about camjobs; the per-actor
rate (images / time inside __call__) shows how much each actor slowed down.

    .venv/bin/python benchmarks/scaling.py --images 256 --model resnet50 --input-size 224
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402  (benchmarks/bench.py: data cache, timing wrappers, machine description)


def worker(args) -> None:
    import ray
    from ray.cluster_utils import Cluster

    import camjobs.job as job
    from camjobs.config import RunConfig

    out = Path(args.scratch) / f"scaling-{args.worker_actors}-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log_path = str(out / "bench-log.jsonl")
    job.CamPredictor = bench.timed_predictor(log_path)
    job.decode_batch = bench.timed_decode(log_path)
    job.localize_batch = bench.timed_localize(log_path)
    os.environ.pop("RAY_ADDRESS", None)
    started = time.time()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.head_cpus, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cluster_ready = time.time()
    try:
        cfg = RunConfig(data=args.data, output=str(out / "output"), model=args.model, classes=args.classes.split(","),
                        input_size=args.input_size, actors=args.worker_actors, gpus_per_actor=1.0,
                        batch_size=args.batch_size, address=cluster.address)
        load_start = os.getloadavg()[0]
        run_started = time.time()
        result = job.run_job(cfg)
        run_finished = time.time()
    finally:
        ray.shutdown()
        cluster.shutdown()
    records = [json.loads(line) for line in open(log_path)]
    predicts = sorted((r for r in records if r["kind"] == "predict"), key=lambda r: r["end"])
    inits = [r for r in records if r["kind"] == "actor_init"]
    per_actor: dict[int, dict] = {}
    for r in predicts:
        a = per_actor.setdefault(r["pid"], {"images": 0, "busy_s": 0.0, "first_end": r["end"], "batches": 0})
        a["images"] += r["n"]
        a["busy_s"] += r["end"] - r["start"]
        a["batches"] += 1
    all_started = max(a["first_end"] for a in per_actor.values())  # every actor has done one batch
    last_end = predicts[-1]["end"]
    in_window = sum(r["n"] for r in predicts if r["end"] > all_started)
    images = result.summary["counts"]["inputs"]
    shutil.rmtree(out / "output", ignore_errors=True)
    print("BENCH-RESULT " + json.dumps({
        "actors": args.worker_actors,
        "images": images,
        "processed": result.summary["counts"]["processed"],
        "rows_per_node": result.summary["rows_per_node"],
        "plan": result.summary["actors"],
        "cluster_start_s": cluster_ready - started,
        "run_job_s": run_finished - run_started,
        "e2e_images_per_s": images / (run_finished - run_started),
        "pipeline_images_per_s": result.summary["throughput"]["pipeline_images_per_s"],
        "steady_images_per_s": in_window / (last_end - all_started) if last_end > all_started else None,
        "steady_window_s": last_end - all_started,
        "first_batch_after_s": predicts[0]["end"] - run_started,
        "actor_torch_threads": [r["torch_threads"] for r in inits],
        "per_actor": [{"images": a["images"], "batches": a["batches"], "busy_s": round(a["busy_s"], 2),
                       "images_per_busy_s": round(a["images"] / a["busy_s"], 3)} for a in per_actor.values()],
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
    }), flush=True)


def run_one(actors: int, args, data: Path, log_dir: Path) -> dict:
    extra = ["--worker-actors", str(actors), "--data", str(data), "--batch-size", str(args.batch_size), "--head-cpus", str(args.head_cpus)]
    log_path = log_dir / f"scaling-{actors}-{int(time.time())}.log"
    return bench.run_script_child(str(Path(__file__).resolve()), args, extra, log_path, f"{actors} actor(s)")


def main(args) -> None:
    data = bench.dataset_dir(Path(args.data_dir), args.images, args.width, args.height)
    Path(args.scratch).mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="scaling-logs-", dir=args.scratch))
    info = bench.machine_info()
    loads = bench.LoadSampler()
    loads.start()
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for round_index in range(args.rounds):
        for actors in ((1, 2) if round_index % 2 == 0 else (2, 1)):
            print(f"scaling: round {round_index + 1}/{args.rounds}, {actors} actor(s) ...", flush=True)
            r = run_one(actors, args, data, log_dir)
            runs[actors].append(r)
            print(f"scaling:   run_job {r['run_job_s']:.1f} s, {r['e2e_images_per_s']:.2f} img/s end to end,"
                  f" steady {r['steady_images_per_s'] or 0:.2f} img/s, per actor {[a['images_per_busy_s'] for a in r['per_actor']]},"
                  f" load {os.getloadavg()[0]:.2f}", flush=True)
    load_values = loads.stop() or [os.getloadavg()[0]]

    def median(actors: int, key: str) -> float:
        values = sorted(r[key] or 0.0 for r in runs[actors])
        return values[(len(values) - 1) // 2] if len(values) % 2 else (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2

    e2e = median(2, "e2e_images_per_s") / (2 * median(1, "e2e_images_per_s"))
    steady = median(2, "steady_images_per_s") / (2 * median(1, "steady_images_per_s"))
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## {now}: scaling, {args.model} at {args.input_size} px, {args.images} images, simulated cluster",
        "",
        f"- Command: `{' '.join(['.venv/bin/python', 'benchmarks/scaling.py'] + sys.argv[1:])}`",
        f"- Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM; "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
        f"- Cluster: head {args.head_cpus} CPUs (decode and write tasks), 2 nodes x (1 CPU, 1 logical GPU); all on these"
        f" {info['cores']} cores; `--gpus-per-actor 1 --batch-size {args.batch_size}`; torch on the CPU, 1 thread per actor",
        f"- 1-minute load average during the run: min {min(load_values):.2f}, mean {sum(load_values) / len(load_values):.2f},"
        f" max {max(load_values):.2f}" + (f"; {args.rounds} rounds, medians" if args.rounds > 1 else ""),
        "",
        "| actors | run_job s | end to end img/s | steady img/s | per-actor img/s (busy time) | rows per node | load start/end |",
        "| ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for actors in (1, 2):
        for r in runs[actors]:
            lines.append(
                f"| {actors} | {r['run_job_s']:.1f} | {r['e2e_images_per_s']:.2f} | {r['steady_images_per_s'] or 0:.2f} |"
                f" {', '.join(str(a['images_per_busy_s']) for a in r['per_actor'])} |"
                f" {', '.join(str(v) for v in r['rows_per_node'].values())} | {r['load_start']:.1f}/{r['load_end']:.1f} |")
    lines += [
        "",
        f"Efficiency rate2 / (2 x rate1): end to end **{e2e:.2f}**, steady state **{steady:.2f}**.",
        "",
    ]
    text = "\n".join(lines)
    print()
    print(text)
    if args.results:
        path = Path(args.results)
        header = "" if path.exists() else "# camjobs CPU throughput\n\nWritten by `benchmarks/bench.py` and `benchmarks/scaling.py`; newest section last.\n\n"
        with open(path, "a") as f:
            f.write(header + text + "\n")
        print(f"scaling: appended to {path}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "machine": info, "loads": load_values}, indent=1, default=str))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench.add_common_args(p, images=256)
    p.add_argument("--batch-size", type=int, default=16, help="--batch-size of the job (its GPU default, 64, leaves few batches per actor)")
    p.add_argument("--head-cpus", type=int, default=2, help="logical CPUs of the head node (decode and write tasks)")
    p.add_argument("--rounds", type=int, default=1, help="1 then 2 actors, then 2 then 1, ... (medians reported)")
    p.add_argument("--worker-actors", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.worker_actors:
        worker(arguments)
    else:
        main(arguments)
