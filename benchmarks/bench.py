"""Throughput of camjobs against the model's own limit and against torchcam / pytorch-grad-cam.

One command measures, on the same images and the same model (same seeded weights):

  bare         (a) read + decode + resize (camjobs.images.load_image) and the model's forward in a
               plain loop: one process, batches like the job's, torch threads = all cores,
               torch.inference_mode, the model prepared as the job runs it. The limit for that
               model on this machine.
  bare-unfolded  the same loop with the model as loaded (BatchNorms not folded).
  job-cam      (b) `camjobs run` end to end (camjobs.pipeline.job.run_job with a RunConfig) in a fresh
               process, so Python start-up, imports, Ray start-up and shutdown are all included;
               plus its steady rate (harness.steady_rate).
  torchcam     (c) torchcam.methods.CAM on the same model + camjobs.pipeline.localize.localize.
  gradcam-lib  (d) pytorch_grad_cam.GradCAM + camjobs.pipeline.localize.localize.
  cj-cam, cj-gradcam  camjobs' own extractors in the same plain loop as (c), (d) (loops.py).
  job-gradcam  `camjobs run --method gradcam` end to end, like job-cam.
  paired       every loop method on each batch in turn, in one process: ratios under the same load.
  job-cli      (optional) the real `camjobs run` command line, uninstrumented: a check that the
               timed job-* runs are representative.

Every variant runs in its own child process (so its peak RSS is its own) and answers with one
JSON line; the parent prints a table and writes a dated section to benchmarks/results-cpu.md (the
round before it on this machine moves to history/). The job-* variants time every stage through
run_job's adapt argument (harness.timed) and sample the process tree (harness.ProcessSampler).

    .venv/bin/python -m benchmarks.bench --images 1024 --model resnet50 --input-size 224
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import datasets, harness, results
from benchmarks.harness import HERE

PROCESS_START = time.time()
DEFAULT_VARIANTS = (
    "bare",
    "bare-unfolded",
    "job-cam",
    "cj-cam",
    "cj-gradcam",
    "torchcam",
    "gradcam-lib",
    "job-gradcam",
    "paired",
)
ALL_VARIANTS = DEFAULT_VARIANTS + ("job-cli",)
TITLE = (
    "camjobs CPU throughput\n\nWritten by `benchmarks/bench.py` and `benchmarks/scaling.py`: the latest round "
    "per script and machine; older rounds in `history/results-cpu.md`."
)


# --------------------------------------------------------------------------- the Ray job, in the child


def _role(pid: int, names: set[str], actor_pids: set[int], decode_pids: set[int]) -> str:
    joined = " ".join(names)
    if pid == os.getpid():
        return "driver"
    if pid in actor_pids:
        return "model actor"
    for role, mark in (("raylet", "raylet"), ("gcs", "gcs_server")):
        if mark in joined:
            return role
    if pid in decode_pids:
        return "decode/write workers"
    return "other ray workers" if "ray::" in joined or "default_worker" in joined else "other ray processes"


def run_job_variant(variant: str, args) -> dict:
    """job-cam / job-gradcam: camjobs.pipeline.job.run_job as `camjobs run` calls it, every stage timed."""
    imports_started = time.time()
    import ray

    from benchmarks.variants import run_variant
    from camjobs.config import RunConfig

    imported = time.time()
    os.environ.pop("RAY_ADDRESS", None)
    out = Path(args.scratch) / f"{variant}-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log_path = str(out / "stages.jsonl")
    cfg = RunConfig(
        data=args.data,
        output=str(out / "output"),
        model=args.model,
        classes=args.classes.split(","),
        input_size=args.input_size,
        method=variant.removeprefix("job-"),
        batch_size=args.job_batch_size,
        actors=args.actors,
    )
    sampler = harness.ProcessSampler()
    sampler.start()
    load_start, run_started = os.getloadavg()[0], time.time()
    result = run_variant(cfg, log_path=log_path)
    run_finished = time.time()
    ray.shutdown()
    shut = time.time()
    sampler.stop()
    records = harness.read_log(log_path)
    actor_pids = {r["pid"] for r in records if r["kind"] == "actor_init"}
    decode_pids = {r["pid"] for r in records if r["kind"] in ("decode", "localize")}
    roles = sampler.roles(lambda pid, names: _role(pid, names, actor_pids, decode_pids))
    shutil.rmtree(out / "output", ignore_errors=True)
    summary = result.summary
    return {
        "variant": variant,
        "images": summary["counts"]["inputs"],
        "exit_code": result.exit_code,
        "message": result.message,
        "processed": summary["counts"]["processed"],
        "errors": summary["counts"]["errors"],
        "summary_timings": summary["timings"],
        "summary_throughput": summary["throughput"],
        "actors": summary["actors"],
        "imports_s": imported - imports_started,
        "process_to_import_s": imports_started - PROCESS_START,
        "run_job_s": run_finished - run_started,
        "ray_shutdown_s": shut - run_finished,
        **harness.stage_figures(records, run_started),
        "driver_peak_rss_mib": harness.peak_rss_mib(),
        "tree_peak_rss_mib": sampler.tree_peak_rss_mib(),
        "roles": roles,
        "top_processes": [
            {
                "role": _role(pid, p["names"], actor_pids, decode_pids),
                "name": _title(p["names"]),
                "cpu_s": round(p["cpu_s"], 1),
            }
            for pid, p in sorted(sampler.procs.items(), key=lambda kv: -kv[1]["cpu_s"])[:10]
        ],
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
    }


def _title(names: set[str]) -> str:
    """A process's most telling title: a Ray task's over an idle worker's."""
    busy = sorted(n for n in names if "IDLE" not in n)
    return next((n for n in busy if n.startswith("ray::")), busy[0] if busy else "ray::IDLE")[:80]


def run_cli_variant(args) -> dict:
    """job-cli: the plain `camjobs run` command, nothing changed; its own summary file for timings."""
    out = Path(args.scratch) / f"job-cli-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    command = [
        str(Path(sys.executable).with_name("camjobs")),
        "run",
        "--data",
        args.data,
        "--output",
        str(out),
        "--model",
        args.model,
        "--classes",
        args.classes,
        "--input-size",
        str(args.input_size),
    ]
    if args.job_batch_size:
        command += ["--batch-size", str(args.job_batch_size)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    elapsed = time.time() - started
    if done.returncode != 0:
        raise SystemExit(f"camjobs run failed ({done.returncode}): {done.stderr[-3000:]}")
    summary = json.loads(next((out / "runs").glob("*.json")).read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {
        "variant": "job-cli",
        "images": summary["counts"]["inputs"],
        "cli_wall_s": elapsed,
        "summary_timings": summary["timings"],
        "summary_throughput": summary["throughput"],
        "children_peak_rss_mib": harness.peak_rss_mib("children"),
    }


def worker_main(args) -> None:
    from benchmarks import loops

    if args.worker in ("job-cam", "job-gradcam"):
        result = run_job_variant(args.worker, args)
    elif args.worker == "job-cli":
        result = run_cli_variant(args)
    elif args.worker == "paired":
        result = loops.run_paired(args)
    else:
        result = loops.run_loop(args.worker, args)
    harness.emit(result)


# --------------------------------------------------------------------------- the parent


def child_args(args) -> list[str]:
    """The options a child needs from the parent's: the model and where to write."""
    return [
        "--model",
        args.model,
        "--input-size",
        str(args.input_size),
        "--classes",
        args.classes,
        "--scratch",
        str(args.scratch),
    ]


def run_child(variant: str, args, data: Path, log_dir: Path) -> dict:
    extra = ["--worker", variant, "--data", str(data), "--batch-size", str(args.batch_size)]
    for flag, value in (
        ("--paired-images", args.paired_images),
        ("--threads", args.threads),
        ("--job-batch-size", args.job_batch_size),
        ("--actors", args.actors),
    ):
        if value:
            extra += [flag, str(value)]
    result = harness.run_child("bench", child_args(args) + extra, log_dir / f"{variant}.log")
    if variant.startswith("job-"):  # end to end, start-up included: from spawning the process to its exit
        result["seconds"] = result["process_wall_s"]
        result["images_per_s"] = result["images"] / result["process_wall_s"]
    return result


def parent_main(args) -> None:
    from benchmarks.bench_report import render

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in ALL_VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(ALL_VARIANTS)}")
    data = datasets.ham10000(Path(args.data_dir), args.images, width=args.width, height=args.height)
    Path(args.scratch).mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="logs-", dir=args.scratch))
    facts = harness.machine_facts()
    command = " ".join([".venv/bin/python -m benchmarks.bench"] + sys.argv[1:])
    print(
        f"bench: {facts['cpu']}, {facts['cores']} cores, {facts['ram_gib']} GiB; load {os.getloadavg()}; "
        f"logs in {log_dir}",
        flush=True,
    )
    loads = harness.LoadSampler()
    loads.start()
    rounds: list[dict[str, dict]] = []
    for round_index in range(args.rounds):
        res: dict[str, dict] = {}
        for variant in variants if round_index % 2 == 0 else variants[::-1]:
            print(f"bench: round {round_index + 1}/{args.rounds} {variant} ...", flush=True)
            r = res[variant] = run_child(variant, args, data, log_dir)
            steady = f", steady {r['steady_images_per_s']:.2f} img/s" if r.get("steady_images_per_s") else ""
            print(
                f"bench:   {r['images_per_s']:.2f} img/s ({r['images']} images in "
                f"{r.get('seconds', r['process_wall_s']):.1f} s{steady}), load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
        rounds.append(res)
    load_values = loads.stop()
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"rounds": rounds, "machine": facts, "loads": load_values, "command": command, "args": vars(args)},
                indent=1,
                default=str,
            )
        )
    section = render(rounds, args, facts, load_values, command)
    print("\n" + section)
    results.publish(args.results, section, results.round_marker("bench.py", facts), TITLE)


def render_saved(args) -> None:
    """--render-json FILE: the Markdown section again from a run's saved raw figures (and its options)."""
    from benchmarks.bench_report import render

    saved = json.loads(Path(args.render_json).read_text())
    saved_args = argparse.Namespace(**{**vars(args), **saved.get("args", {})})
    mtime = Path(args.render_json).stat().st_mtime
    when = dt.datetime.fromtimestamp(mtime, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = render(saved["rounds"], saved_args, saved["machine"], saved["loads"], saved["command"], when)
    print("\n" + section)
    results.publish(args.results, section, results.round_marker("bench.py", saved["machine"]), TITLE)


def add_common_args(p: argparse.ArgumentParser, images: int) -> None:
    """Options bench.py and scaling.py share: the model, the synthetic data, where results go."""
    p.add_argument("--images", type=int, default=images)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--classes", default="mel,nv,bkl")
    p.add_argument("--width", type=int, default=600)
    p.add_argument("--height", type=int, default=450)
    p.add_argument(
        "--data-dir",
        default=os.environ.get("CAMJOBS_BENCH_DATA", "/tmp/camjobs-bench-data"),
        help="synthetic data cache",
    )
    p.add_argument(
        "--scratch",
        default=os.environ.get("CAMJOBS_BENCH_SCRATCH", "/tmp/camjobs-bench-out"),
        help="job outputs and logs",
    )
    p.add_argument(
        "--results",
        default=str(HERE / "results-cpu.md"),
        help="Markdown results file ('' for none); its last round on this machine moves to history/",
    )
    p.add_argument("--json", default=None, help="also write every raw figure to this JSON file")
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(p, images=1024)
    p.add_argument("--batch-size", type=int, default=16, help="batch of the plain loops (the job's CPU default is 16)")
    p.add_argument("--job-batch-size", type=int, default=None, help="--batch-size for the job [default: the job's own]")
    p.add_argument("--actors", type=int, default=None, help="--actors for the job [default: the job's own]")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the plain loops [default: all cores]")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {', '.join(ALL_VARIANTS)}")
    p.add_argument(
        "--paired-images", type=int, default=128, help="images of the 'paired' variant (it runs all five loop methods)"
    )
    p.add_argument(
        "--rounds", type=int, default=1, help="run every variant this many times (every other round in reverse order)"
    )
    p.add_argument("--render-json", default=None, help="only render the Markdown section of a run saved with --json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
    elif args.render_json:
        render_saved(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
