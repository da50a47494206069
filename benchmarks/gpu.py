"""camjobs on one GPU machine: the bare model's limit, the CPU stages, and `camjobs run` end to end.

Prepared for one run on a rented GPU machine under a hard time limit (about 6 minutes); with
small sizes it also runs on a CPU-only machine, which is how it is tested:

    python -m benchmarks.gpu --images 8192 --unique 1024 --work /tmp/gpubench --json gpu.json \
        --results benchmarks/results-gpu.md [--steps forward,jobs] [--time-budget 330]
    .venv/bin/python -m benchmarks.gpu --images 48 --unique 16 --work /tmp/gpubench-test \
        --json /tmp/gpubench-test.json --results /tmp/gpubench-test.md        # CPU check, ~5 minutes

Steps, in order: machine, data (HAM10000 layout: --unique images from camjobs.synth, the rest
copies under new ids; reused when present), forward (fp32; bf16 autocast + channels_last; the
same with BatchNorms folded as the job does, "the bare bf16 forward pass"; camjobs' CAM and
Grad-CAM extractors), stages (ms per image on one core), bare-loop (one process: decode + bf16
forward), bare-parallel (a decode pool + bf16 forward: the ceiling without Ray), jobs (run_job in
a fresh child process per variant), render. A failing step is recorded with its traceback and
the next one runs; a step that would end past --time-budget seconds is skipped. The JSON file
(every raw figure) is replaced atomically after every step, and the Markdown section is rewritten
in place, so a run killed part-way keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
import traceback
from pathlib import Path

from benchmarks import datasets, harness, results
from benchmarks.variants import NAMES

START = time.time()
ARCH, CLASSES, SIZE = "resnet50", ["mel", "nv", "bkl"], 224
STEPS = ("machine", "data", "forward", "stages", "bare-loop", "bare-parallel", "jobs", "render")
ESTIMATE_S = {
    "machine": 10,
    "data": 45,
    "forward": 45,
    "stages": 20,
    "bare-loop": 30,
    "bare-parallel": 30,
    "jobs": 45,
    "render": 0,
}
JOB_TIMEOUT_S = 120
# (variant, method, actors, GPU share per actor) on a GPU; on CPUs: no GPU share, at most 2 actors
JOBS = (
    ("job-cam", "cam", 1, None),
    ("job-gradcam", "gradcam", 1, None),
    ("job-cam-2x0.5", "cam", 2, 0.5),
    ("job-cam-4x0.25", "cam", 4, 0.25),
)
# Pipeline experiments, run only when named in --jobs: job-cam-<variant>, one actor, with any of
# variants.NAMES (e.g. job-cam-split16, job-cam-gpudecode, job-cam-halfcpu+decode8).
EXPERIMENTS = (
    "job-cam-gpudecode",
    "job-cam-decode8",
    "job-cam-halfcpu",
    "job-cam-noreserve",
    "job-cam-nodownstream",
    "job-cam-split16",
)
TITLE = (
    "camjobs GPU throughput\n\nWritten by `benchmarks/gpu.py`: the latest run per machine; older runs in "
    "`history/results-gpu.md`. Each section names the JSON file that holds its raw figures."
)


def log(message: str) -> None:
    print(f"gpu.py [{time.time() - START:5.0f} s] {message}", file=sys.stderr, flush=True)


def sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def bf16_forward(device, batch: int):
    """A function from a (B, H, W, 3) uint8 batch to the bf16 channels_last forward pass of the model,
    normalized on the device as CamPredictor does; warmed up with one batch."""
    import numpy as np
    import torch

    from camjobs.models.inference import prepare_for_inference
    from camjobs.models.networks import load_model

    loaded = load_model(arch=ARCH, classes=CLASSES, input_size=SIZE)
    model = prepare_for_inference(loaded.model, device)
    mean = torch.tensor(loaded.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std, device=device).view(1, 3, 1, 1)

    def forward(pixels):
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            images = torch.from_numpy(pixels).to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
            model(((images - mean) / std).contiguous(memory_format=torch.channels_last))
        sync(device)

    forward(np.zeros((batch, SIZE, SIZE, 3), np.uint8))  # warm-up, untimed
    return forward


def reduced_default():
    """load_image's reduced_decode default, or None where load_image has no such keyword."""
    import inspect

    from camjobs.images import load_image

    parameter = inspect.signature(load_image).parameters.get("reduced_decode")
    return None if parameter is None else parameter.default


# --------------------------------------------------------------------------- steps


def step_machine(ctx, res: dict) -> None:
    res.update(harness.machine_facts(torch_gpu=True))


def step_data(ctx, res: dict) -> None:
    args = ctx.args
    unique = min(args.unique, args.images)
    started, before = time.time(), set(Path(args.work).glob("ham10000-*"))
    ctx.data = datasets.ham10000(Path(args.work), args.images, unique, processes=os.cpu_count() or 1)
    paths = datasets.image_paths(ctx.data)
    res.update(
        path=str(ctx.data),
        images=args.images,
        unique=unique,
        reused=ctx.data in before,
        synth_processes=os.cpu_count(),
        seconds=round(time.time() - started, 2),
        jpeg_mib=round(sum(map(os.path.getsize, paths)) / 2**20, 1),
    )


def timed_loop(fn, device, batch: int, warmup: int, seconds: float) -> dict:
    """images/s of fn() over one batch: warm-up calls, then calls until `seconds` have passed."""
    import torch

    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    calls, started = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - started < seconds:
        fn()
        sync(device)
        calls += 1
    elapsed = time.perf_counter() - started
    out = {"images_per_s": round(batch * calls / elapsed, 2), "calls": calls, "seconds": round(elapsed, 3)}
    if device.type == "cuda":
        out["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def step_forward(ctx, res: dict) -> None:
    import torch

    from camjobs.cam import build_extractor
    from camjobs.models.inference import prepare_for_inference
    from camjobs.models.networks import load_model

    device, batch = ctx.device, ctx.batch
    warmup, seconds = (5, 3.0) if device.type == "cuda" else (1, 2.0)
    res.update(
        device=str(device),
        batch=batch,
        warmup=warmup,
        cudnn_benchmark=torch.backends.cudnn.benchmark,
        cudnn_tf32=torch.backends.cudnn.allow_tf32,
        matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
    )
    model = load_model(arch=ARCH, classes=CLASSES, input_size=SIZE).model.to(device).eval()
    x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)).to(device)

    def fp32():
        with torch.inference_mode():
            model(x)

    res["fp32"] = timed_loop(fp32, device, batch, warmup, seconds)
    ctx.save()
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)

    def bf16():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            model(x)

    res["bf16_unfolded"] = timed_loop(bf16, device, batch, warmup, seconds)
    ctx.save()
    model = prepare_for_inference(model, device)  # as the model actor runs it
    res["bf16"] = timed_loop(bf16, device, batch, warmup, seconds)
    ctx.save()
    for method in ("cam", "gradcam"):
        extractor = build_extractor(method, model)

        def explain(method=method, extractor=extractor):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                if method == "gradcam":  # Grad-CAM turns grad on itself, as in the model actor
                    return extractor(x).maps
                with torch.inference_mode():
                    return extractor(x).maps

        try:
            res[method] = timed_loop(explain, device, batch, warmup, seconds)
        finally:
            extractor.remove_hooks()
        ctx.save()
    if ctx.data is not None:
        res["device_decode"] = device_decode(ctx, warmup, seconds)
        ctx.save()


def device_decode(ctx, warmup: int, seconds: float) -> dict:
    """--decode-on gpu's part in the actor: one batch of the dataset's JPEGs decoded with nvJPEG,
    turned upright and resized to the input on the device (camjobs.pipeline.gpu_decode)."""
    from camjobs.images import inspect_header
    from camjobs.pipeline.gpu_decode import decode_to_input

    encoded = [Path(p).read_bytes() for p in datasets.image_paths(ctx.data)[: ctx.batch]]
    headers = [inspect_header(data) for data in encoded]
    sizes, orientations = [h[:2] for h in headers], [h[2] for h in headers]
    return timed_loop(
        lambda: decode_to_input(encoded, sizes, orientations, SIZE, ctx.device),
        ctx.device,
        len(encoded),
        warmup,
        seconds,
    )


def smooth_maps(count: int):
    """7x7 maps with one Gaussian bump and a little noise each: shaped like a CAM, unlike white noise."""
    import torch

    gen, grid, maps = torch.Generator().manual_seed(0), torch.arange(7.0), []
    for _ in range(count):
        cy, cx, width = (
            torch.rand(3, generator=gen) * torch.tensor([4.0, 4.0, 1.5]) + torch.tensor([1.5, 1.5, 1.0])
        ).tolist()
        bump = torch.exp(-((grid[:, None] - cy) ** 2 + (grid[None, :] - cx) ** 2) / (2 * width**2))
        maps.append(3 * bump + 0.2 * torch.randn(7, 7, generator=gen) - 0.5)
    return maps


def per_image_ms(fn, items) -> float:
    fn(items[0])  # warm-up
    started = time.perf_counter()
    for item in items:
        fn(item)
    return round(1000 * (time.perf_counter() - started) / len(items), 3)


def step_stages(ctx, res: dict) -> None:
    import cv2
    import torch

    from camjobs.images import load_image
    from camjobs.pipeline.localize import encode_png, localize

    paths, default = datasets.image_paths(ctx.data)[:100], reduced_default()
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        res.update(images=len(paths), load_image_reduced_default=default)
        full = {} if default is None else {"reduced_decode": False}
        res["decode_full_ms"] = per_image_ms(lambda p: load_image(p, input_size=SIZE, **full), paths)
        try:
            reduced = per_image_ms(lambda p: load_image(p, input_size=SIZE, reduced_decode=True), paths)
            res["decode_reduced_ms"] = reduced
        except TypeError as exc:
            res["decode_reduced_ms"], res["decode_reduced_error"] = None, str(exc)
        maps = smooth_maps(len(paths))
        res["localize_cpu_ms"] = per_image_ms(lambda m: localize(m, 450, 600), maps)
        heatmaps = [localize(m, 450, 600).heatmap for m in maps]
        res["png_ms"] = per_image_ms(encode_png, heatmaps)
        res["png_kib"] = round(sum(len(encode_png(h)) for h in heatmaps) / len(heatmaps) / 1024, 1)
        if ctx.device.type == "cuda":  # as in the model actor, where the map is still on the GPU
            res["localize_gpu_ms"] = per_image_ms(lambda m: localize(m, 450, 600), [m.to(ctx.device) for m in maps])
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)


def step_bare_loop(ctx, res: dict) -> None:
    import numpy as np

    from camjobs.images import load_image

    paths, forward = datasets.image_paths(ctx.data)[:1024], bf16_forward(ctx.device, ctx.batch)
    decode_s = model_s = 0.0
    started = time.perf_counter()
    for first in range(0, len(paths), ctx.batch):
        t0 = time.perf_counter()
        pixels = np.stack([load_image(p, input_size=SIZE).pixels for p in paths[first : first + ctx.batch]])
        t1 = time.perf_counter()
        forward(pixels)
        decode_s, model_s = decode_s + t1 - t0, model_s + time.perf_counter() - t1
    elapsed = time.perf_counter() - started
    res.update(
        images=len(paths),
        batch=ctx.batch,
        load_image_reduced_default=reduced_default(),
        seconds=round(elapsed, 3),
        images_per_s=round(len(paths) / elapsed, 2),
        decode_s=round(decode_s, 3),
        model_s=round(model_s, 3),
        peak_rss_mib=harness.peak_rss_mib(),
    )


def step_bare_parallel(ctx, res: dict) -> None:
    import functools

    import numpy as np

    from camjobs.images import load_image

    paths, forward = datasets.image_paths(ctx.data), bf16_forward(ctx.device, ctx.batch)
    workers = max(1, (os.cpu_count() or 2) - 1)
    buffer, done, first_end, first_n = [], 0, None, 0
    started = time.perf_counter()
    with ctx.pool_context().Pool(workers) as pool:
        for decoded in pool.imap(functools.partial(load_image, input_size=SIZE), paths, chunksize=16):
            buffer.append(decoded.pixels)
            if len(buffer) == ctx.batch or done + len(buffer) == len(paths):
                forward(np.stack(buffer))
                done, buffer = done + len(buffer), []
                if first_end is None:
                    first_end, first_n = time.perf_counter(), done
        ended = time.perf_counter()
    after_first = (len(paths) - first_n) / (ended - first_end) if len(paths) > first_n else None
    res.update(
        images=len(paths),
        workers=workers,
        batch=ctx.batch,
        seconds=round(ended - started, 3),
        images_per_s=round(len(paths) / (ended - started), 2),
        first_batch_after_s=round(first_end - started, 3),
        after_first_images_per_s=harness.rounded(after_first),
        peak_rss_mib=harness.peak_rss_mib(),
    )


def worker_main(spec: dict) -> None:
    """One `camjobs run` (run_job with a RunConfig, as the CLI calls it) in this fresh process,
    every stage timed, the variant's changes passed to run_job as values."""
    imports_started = time.time()
    import ray

    from benchmarks.variants import copy_ray_data_log, parse_variant, run_variant
    from camjobs.config import RunConfig

    os.environ.pop("RAY_ADDRESS", None)
    output = spec["output"].rstrip("/")
    shutil.rmtree(output, ignore_errors=True)
    stage_log = Path(output + ".stages.jsonl")
    stage_log.unlink(missing_ok=True)
    cfg = RunConfig(
        data=spec["data"],
        output=output,
        model=ARCH,
        classes=CLASSES,
        input_size=SIZE,
        method=spec["method"],
        actors=spec["actors"],
        gpus_per_actor=spec["gpus_per_actor"],
        batch_size=spec["batch_size"],
    )
    sampler = harness.ProcessSampler(interval=0.5, gpu=True)
    sampler.start()
    started = time.time()
    result = run_variant(cfg, parse_variant(spec["variant"]), str(stage_log))
    finished = time.time()
    copy_ray_data_log(output + ".ray-data.log")  # Ray Data's per-operator budgets and queues, at DEBUG
    ray.shutdown()
    figures = harness.stage_figures(harness.read_log(stage_log), started)
    out = {
        "exit_code": result.exit_code,
        "message": result.message,
        "counts": result.summary["counts"],
        "timings": result.summary["timings"],
        "throughput": result.summary["throughput"],
        "actors": result.summary["actors"],
        "imports_s": round(started - imports_started, 3),
        "run_job_s": round(finished - started, 3),
        "ray_shutdown_s": round(time.time() - finished, 3),
        "driver_peak_rss_mib": harness.peak_rss_mib(),
        "steady_images_per_s": figures["steady_images_per_s"],
        "after_first_images_per_s": figures["after_first_images_per_s"],
        **sampler.stop().summary(),
    }
    shutil.rmtree(output, ignore_errors=True)  # the heatmaps of 16,384 images, per job
    harness.emit(out)


def job_spec(ctx, name: str) -> dict:
    """What a job variant runs: method, actors, GPU share, pipeline variant (job-cam-<variant>)."""
    on_gpu = ctx.device.type == "cuda"
    standard = {job[0]: job[1:] for job in JOBS}
    method, actors, share = standard.get(name, ("cam", 1, None))
    variant = "default" if name in standard else name.removeprefix("job-cam-")
    from benchmarks.variants import parse_variant

    parse_variant(variant)  # an unknown name fails here, before any job runs
    return {
        "data": str(ctx.data),
        "output": str(Path(ctx.args.work) / "jobs" / name),
        "method": method,
        "actors": actors if on_gpu else min(actors, 2),
        "gpus_per_actor": share if on_gpu else None,
        "batch_size": ctx.args.job_batch_size or None,
        "variant": variant,
    }


def step_jobs(ctx, res: dict) -> None:
    if ctx.device.type == "cuda":  # give back what the earlier steps' caching allocator holds
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()
    chosen = ctx.args.jobs.split(",") if ctx.args.jobs else [name for name, *_ in JOBS]
    specs = {name: job_spec(ctx, name) for name in chosen}
    for name, spec in specs.items():
        left = ctx.args.time_budget - (time.time() - START)
        if left < ESTIMATE_S["jobs"]:
            res[name] = {"status": "skipped: time budget"}
            continue
        log_path = Path(ctx.args.work) / "logs" / f"{name}.log"
        run = harness.run_child("gpu", ["--worker", json.dumps(spec)], log_path, min(JOB_TIMEOUT_S, left), check=False)
        run["wall_s"] = run.pop("process_wall_s")
        if run["status"] == "ok":
            run["images_per_s"] = round(run["counts"]["inputs"] / run["wall_s"], 2)  # spawn to exit
        res[name] = {"spec": spec, **run}
        log(f"      {name}: {run['status']}, {run.get('images_per_s', '-')} images/s, {run['wall_s']:.0f} s")
        ctx.save()
    bad = [n for n, r in res.items() if r["status"] not in ("ok", "skipped: time budget")]
    if bad:
        raise RuntimeError(f"job variant(s) failed: {', '.join(bad)} (see their 'error' and 'log')")


# --------------------------------------------------------------------------- driver


class Context:
    def __init__(self, args):
        import torch

        self.args, self.data, self._pool, self._md_prefix = args, None, None, None
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.batch = args.batch or (256 if self.device.type == "cuda" else 16)
        self.facts = harness.machine_facts()
        self.state = {
            "started_at": harness.utc_now(),
            "json": args.json,
            "args": vars(args),
            "steps": {},
            "command": "python -m benchmarks.gpu " + shlex.join(sys.argv[1:]),
        }

    def pool_context(self):
        """forkserver: pool workers inherit neither this process's CUDA context nor its OpenMP threads."""
        import multiprocessing

        if self._pool is None:
            self._pool = multiprocessing.get_context("forkserver")
            self._pool.set_forkserver_preload(["camjobs.images", "camjobs.synth"])
        return self._pool

    def save(self) -> None:
        results.atomic_write(self.args.json, json.dumps(self.state, indent=1, default=str))

    def save_markdown(self) -> None:
        """This run's section, rewritten in place after every step, after the file as it was before
        the run (with this machine's earlier run moved to history/)."""
        from benchmarks.gpu_report import render

        if not self.args.results or "render" not in self.args.steps:
            return
        marker = results.round_marker("gpu.py", self.facts)
        if self._md_prefix is None:
            self._md_prefix = results.retire_rounds(self.args.results, marker) or f"# {TITLE}\n"
        try:
            section = render(self.state)
        except Exception:  # a rendering bug must not cost the run: the figures are in the JSON file
            log("render failed; every figure is in the JSON file")
            section = (
                f"## {self.state['started_at']}: rendering failed\n\nSee `{self.args.json}`.\n\n```\n"
                f"{traceback.format_exc()[-2000:]}```\n"
            )
        results.atomic_write(
            self.args.results, self._md_prefix.rstrip("\n") + "\n\n" + results.with_marker(section, marker)
        )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--unique", type=int, default=1024)
    parser.add_argument("--work", default="/tmp/gpubench")
    parser.add_argument("--json", default="gpu.json")
    parser.add_argument(
        "--results",
        default="benchmarks/results-gpu.md",
        help="Markdown results file ('' for none); its last run on this machine moves to history/",
    )
    parser.add_argument("--steps", default=",".join(STEPS), help=f"a comma-separated subset of {','.join(STEPS)}")
    parser.add_argument(
        "--time-budget", type=float, default=330.0, help="skip steps that would end later (seconds from start)"
    )
    parser.add_argument("--batch", type=int, default=0, help="forward batch (default 256 on a GPU, 16 on CPUs)")
    parser.add_argument("--job-batch-size", type=int, default=0, help="the jobs' batch_size (default: the job's own)")
    parser.add_argument(
        "--jobs",
        default="",
        help="comma-separated job variants [default: the four standard ones, "
        f"{', '.join(name for name, *_ in JOBS)}]; experiments: job-cam-VARIANT, e.g. "
        f"{', '.join(EXPERIMENTS)}; VARIANT is {NAMES}",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if set(args.steps) - set(STEPS):
        parser.error(f"unknown step(s) {', '.join(sorted(set(args.steps) - set(STEPS)))}; steps: {', '.join(STEPS)}")
    if args.images < 1 or args.unique < 1:
        parser.error("--images and --unique must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker_main(json.loads(args.worker))
    Path(args.work).mkdir(parents=True, exist_ok=True)
    ctx = Context(args)
    functions = {
        "machine": step_machine,
        "data": step_data,
        "forward": step_forward,
        "stages": step_stages,
        "bare-loop": step_bare_loop,
        "bare-parallel": step_bare_parallel,
        "jobs": step_jobs,
    }
    for number, name in enumerate(STEPS[:-1]):
        if name not in args.steps:
            continue
        entry = ctx.state["steps"][name] = {"status": "running", "result": {}}
        started = time.time()
        if started - START + ESTIMATE_S[name] > args.time_budget:
            entry["status"] = "skipped: time budget"
        else:
            try:
                if name in ("stages", "bare-loop", "bare-parallel", "jobs") and ctx.data is None:
                    step_data(ctx, {})
                functions[name](ctx, entry["result"])
                entry["status"] = "ok"
            except Exception:  # a failing step must not stop the others
                entry["status"], entry["error"] = "failed", traceback.format_exc()[-4000:]
        entry["seconds"] = round(time.time() - started, 2)
        ctx.state["last_step"] = name
        log(f"[{number}] {name}: {entry['status']} ({entry['seconds']:.1f} s)")
        ctx.save()
        ctx.save_markdown()
    ctx.state["finished"], ctx.state["total_s"] = True, round(time.time() - START, 1)
    ctx.save()
    ctx.save_markdown()
    log(
        f"[7] render: {args.results if 'render' in args.steps and args.results else 'not written'}; JSON {args.json}; "
        f"done in {ctx.state['total_s']} s"
    )


if __name__ == "__main__":
    main()
