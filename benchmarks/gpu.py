"""camjobs on one GPU machine: the bare model's limit, the CPU stages, and `camjobs run` end to end.

Prepared for one run on a rented GPU machine under a hard time limit (about 6 minutes); with
small sizes it also runs on a CPU-only machine, which is how it is tested:

    python benchmarks/gpu.py --images 8192 --unique 1024 --work /tmp/gpubench --json gpu.json \
        --results benchmarks/results-gpu.md [--steps forward,jobs] [--time-budget 330]
    .venv/bin/python benchmarks/gpu.py --images 48 --unique 16 --work /tmp/gpubench-test \
        --json /tmp/gpubench-test.json --results /tmp/gpubench-test.md        # CPU check, ~5 minutes

Steps, in order: machine, data (HAM10000 layout: --unique images from camjobs.synth, the rest
copies under new ids; reused when present), forward (fp32; bf16 autocast + channels_last; the
same with BatchNorms folded as the job does, "the bare bf16 forward pass"; camjobs' CAM and
Grad-CAM extractors), stages (ms per image on one core),
bare-loop (one process: decode + bf16 forward), bare-parallel (a decode pool + bf16 forward: the
ceiling without Ray), jobs (camjobs.job.run_job in a fresh child process per variant), render.
A failing step is recorded with its traceback and the next one runs; a step that would end past
--time-budget seconds is skipped. The JSON file (every raw figure) is replaced atomically after
every step, and the Markdown section is rewritten in place, so a run killed part-way keeps what
it measured.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import itertools
import json
import logging
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

START = time.time()
ARCH, CLASSES, SIZE = "resnet50", ["mel", "nv", "bkl"], 224
STEPS = ("machine", "data", "forward", "stages", "bare-loop", "bare-parallel", "jobs", "render")
ESTIMATE_S = {"machine": 10, "data": 45, "forward": 45, "stages": 20, "bare-loop": 30, "bare-parallel": 30, "jobs": 45, "render": 0}
JOB_TIMEOUT_S = 120
# (variant, method, actors, GPU share per actor) on a GPU; on CPUs: no GPU share, at most 2 actors
JOBS = (("job-cam", "cam", 1, None), ("job-gradcam", "gradcam", 1, None),
        ("job-cam-2x0.5", "cam", 2, 0.5), ("job-cam-4x0.25", "cam", 4, 0.25))
# Pipeline experiments, run only when named in --jobs: (variant, method, actors, GPU share, settings)
# with settings applied in the job's driver before run_job ("cfg.NAME": a RunConfig field, "job.NAME":
# a camjobs.job constant, else a Ray Data DataContext field): JPEGs decoded by the actor with nvJPEG
# (--decode-on gpu); rows per decode task on GPU plans (8, the default before it became 32); CPUs
# reserved per decode and localize task (0.5, the default before it became 1);
# Ray Data's per-operator resource reservation (on by default; off lets any stage use any idle CPU)
# and its downstream-capacity backpressure; the actor's 256-row blocks split into 16-row blocks
# before the localize stage (the pipeline until 2026-11-26 evening; schedule.split_before_localize).
EXPERIMENTS = {
    "job-cam-gpudecode": ("cam", 1, None, {"cfg.decode_on": "gpu"}),
    "job-cam-decode8": ("cam", 1, None, {"job.GPU_DECODE_ROWS": 8}),
    "job-cam-halfcpu": ("cam", 1, None, {"job.STAGE_CPUS": 0.5}),
    "job-cam-noreserve": ("cam", 1, None, {"op_resource_reservation_enabled": False}),
    "job-cam-nodownstream": ("cam", 1, None, {"downstream_capacity_backpressure_ratio": None}),
    "job-cam-split16": ("cam", 1, None, {"split_before_localize": 16}),
}
# The first two targets are the issue's; the Grad-CAM and scaling bounds are this script's.
TARGET_FORWARD_RATIO, TARGET_RATE, GRADCAM_MAX_COST, SCALING_MIN = 0.8, 2000.0, 1.15, 1.0


def log(message: str) -> None:
    print(f"gpu.py [{time.time() - START:5.0f} s] {message}", file=sys.stderr, flush=True)


def maxrss_mib(who=resource.RUSAGE_SELF) -> float:
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)  # KiB on Linux


def proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (session id, RSS bytes) of every live (not zombie) process in /proc."""
    page, table = os.sysconf("SC_PAGE_SIZE"), {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as file:
                    fields = file.read().rsplit(")", 1)[1].split()
                if fields[0] != "Z":
                    table[int(name)] = (int(fields[3]), int(fields[21]) * page)
            except (OSError, ValueError, IndexError):
                pass
    return table


def kill_session(sid: int) -> int:
    """SIGKILL what is left of a child's session (the child and the Ray processes it started), again
    until none is left: a dying raylet can still be starting a process."""
    killed: set[int] = set()
    for _ in range(20):
        pids = [pid for pid, (s, _) in proc_table().items() if s == sid and pid != os.getpid()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        killed.update(pids)
        time.sleep(0.25)
    return len(killed)


def nvidia_smi(query: str, units: bool = True) -> list[str] | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader" + ("" if units else ",nounits")],
                              capture_output=True, text=True, timeout=10)
        return [line.strip() for line in done.stdout.splitlines() if line.strip()] or None
    except (OSError, subprocess.SubprocessError):
        return None


def sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def bf16_forward(device, batch: int):
    """A function from a (B, H, W, 3) uint8 batch to the bf16 channels_last forward pass of the model,
    normalized on the device as CamPredictor does; warmed up with one batch."""
    import numpy as np
    import torch

    from camjobs.models import load_model, prepare_for_inference

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


def image_paths(data: Path) -> list[str]:
    return sorted(str(p) for part in ("HAM10000_images_part_1", "HAM10000_images_part_2") for p in (data / part).glob("*.jpg"))


def reduced_default():
    """load_image's reduced_decode default, or None where load_image has no such keyword."""
    import inspect

    from camjobs.decode import load_image

    parameter = inspect.signature(load_image).parameters.get("reduced_decode")
    return None if parameter is None else parameter.default


# --------------------------------------------------------------------------- steps


def step_machine(ctx, res: dict) -> None:
    import cv2
    import numpy
    import PIL
    import pyarrow
    import ray
    import torch
    import torchvision

    import camjobs

    mem = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal:"))
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")), "?")
    raylets = sum(1 for pid in proc_table() if b"raylet" in _read(f"/proc/{pid}/cmdline"))
    res.update(cpu=cpu, cores=os.cpu_count(), ram_gib=round(int(mem.split()[1]) / 2**20, 1), platform=platform.platform(),
               date_utc=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), raylets_running_before=raylets,
               nvidia_smi=nvidia_smi("name,driver_version,memory.total"), cuda_available=torch.cuda.is_available(),
               # what a container may limit below cpu_count: usable cores, and /dev/shm (Ray's object
               # store falls back to /tmp, much slower, when /dev/shm is too small)
               usable_cores=len(os.sched_getaffinity(0)),
               dev_shm_gib=round(shutil.disk_usage("/dev/shm").total / 2**30, 1) if Path("/dev/shm").is_dir() else None)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        res.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count(),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    res["versions"] = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
                       "ray": ray.__version__, "pyarrow": pyarrow.__version__, "opencv": cv2.__version__,
                       "Pillow": PIL.__version__, "numpy": numpy.__version__, "camjobs": camjobs.__version__}


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""


def _synth_chunk(job: tuple[str, int, int]) -> None:
    from camjobs.synth import synth_dataset

    synth_dataset(job[0], n=job[1], seed=job[2])


def make_dataset(ctx, res: dict) -> Path:
    """--images JPEGs in the HAM10000 layout: --unique from synth_dataset in parallel chunks (one seed
    each), renumbered into one id sequence; then copies of them under new image and lesion ids."""
    images, unique = ctx.args.images, min(ctx.args.unique, ctx.args.images)
    target = Path(ctx.args.work) / f"ham10000-n{images}-u{unique}"
    if len(image_paths(target)) == images and len(_read(str(target / "HAM10000_metadata.csv")).splitlines()) == images + 1:
        res.update(path=str(target), images=images, unique=unique, reused=True)
        return target
    shutil.rmtree(target, ignore_errors=True)
    scratch = Path(ctx.args.work) / f".build-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    chunks = min(os.cpu_count() or 1, math.ceil(unique / 8))
    started = time.time()
    with ctx.pool_context().Pool(chunks) as pool:
        pool.map(_synth_chunk, [(str(scratch / f"chunk{k}"), unique // chunks + (k < unique % chunks), k) for k in range(chunks)])
    res["synth_s"] = round(time.time() - started, 2)
    first, half = 24306, images // 2  # ISIC_0024306 is HAM10000's first id; the first half goes to part_1
    parts = [scratch / "HAM10000_images_part_1", scratch / "HAM10000_images_part_2"]
    masks = scratch / "HAM10000_segmentations_lesion_tschandl"
    for folder in (*parts, masks):
        folder.mkdir(parents=True, exist_ok=True)
    rows, lesions = [], {}
    for k in range(chunks):
        chunk = scratch / f"chunk{k}"
        with open(chunk / "HAM10000_metadata.csv", newline="") as file:
            for row in sorted(csv.DictReader(file), key=lambda r: r["image_id"]):
                old, new = row["image_id"], f"ISIC_{first + len(rows):07d}"
                row.update(image_id=new, lesion_id=lesions.setdefault((k, row["lesion_id"]), f"HAM_{len(lesions):07d}"))
                os.replace(next(chunk.glob(f"HAM10000_images_part_*/{old}.jpg")), parts[len(rows) >= half] / f"{new}.jpg")
                os.replace(chunk / masks.name / f"{old}_segmentation.png", masks / f"{new}_segmentation.png")
                rows.append(row)
        shutil.rmtree(chunk)
    for index in range(unique, images):  # copies: new image id, each its own new lesion (no mask)
        source = rows[index % unique]
        row = dict(source, image_id=f"ISIC_{first + index:07d}", lesion_id=f"HAM_{len(lesions) + index:07d}")
        shutil.copyfile(parts[index % unique >= half] / f"{source['image_id']}.jpg", parts[index >= half] / f"{row['image_id']}.jpg")
        rows.append(row)
    with open(scratch / "HAM10000_metadata.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(scratch, target)
    res.update(path=str(target), images=images, unique=unique, reused=False, synth_processes=chunks,
               seconds=round(time.time() - started, 2), jpeg_mib=round(sum(map(os.path.getsize, image_paths(target))) / 2**20, 1))
    return target


def step_data(ctx, res: dict) -> None:
    ctx.data = make_dataset(ctx, res)


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
    from camjobs.models import load_model, prepare_for_inference

    device, batch = ctx.device, ctx.batch
    warmup, seconds = (5, 3.0) if device.type == "cuda" else (1, 2.0)
    res.update(device=str(device), batch=batch, warmup=warmup, cudnn_benchmark=torch.backends.cudnn.benchmark,
               cudnn_tf32=torch.backends.cudnn.allow_tf32, matmul_tf32=torch.backends.cuda.matmul.allow_tf32)
    model = load_model(arch=ARCH, classes=CLASSES, input_size=SIZE).model.to(device).eval()
    x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)).to(device)

    def fp32():
        with torch.inference_mode():
            model(x)

    res["fp32"] = timed_loop(fp32, device, batch, warmup, seconds)
    ctx.save()
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731

    def bf16():
        with torch.inference_mode(), amp():
            model(x)

    # The runs before BatchNorm folding measured this one as "the bare bf16 forward".
    res["bf16_unfolded"] = timed_loop(bf16, device, batch, warmup, seconds)
    ctx.save()
    model = prepare_for_inference(model, device)  # as the model actor runs it
    res["bf16"] = timed_loop(bf16, device, batch, warmup, seconds)
    ctx.save()
    for method in ("cam", "gradcam"):
        extractor = build_extractor(method, model)

        def explain():
            if method == "cam":
                with torch.inference_mode(), amp():
                    return extractor(x).maps
            with amp():  # Grad-CAM turns grad on itself, as in the model actor
                return extractor(x).maps

        try:
            res[method] = timed_loop(explain, device, batch, warmup, seconds)
        finally:
            extractor.remove_hooks()
        ctx.save()
    if ctx.data is not None:
        # --decode-on gpu's part in the actor: one batch of the dataset's JPEGs decoded with nvJPEG,
        # turned upright and resized to the input on the device (camjobs.gpu_decode).
        from camjobs.decode import inspect_header
        from camjobs.gpu_decode import decode_to_input

        encoded = [Path(p).read_bytes() for p in image_paths(ctx.data)[:batch]]
        headers = [inspect_header(data) for data in encoded]
        sizes, orientations = [h[:2] for h in headers], [h[2] for h in headers]
        res["device_decode"] = timed_loop(lambda: decode_to_input(encoded, sizes, orientations, SIZE, device),
                                          device, len(encoded), warmup, seconds)
        ctx.save()


def smooth_maps(count: int):
    """7x7 maps with one Gaussian bump and a little noise each: shaped like a CAM, unlike white noise."""
    import torch

    gen, grid, maps = torch.Generator().manual_seed(0), torch.arange(7.0), []
    for _ in range(count):
        cy, cx, width = (torch.rand(3, generator=gen) * torch.tensor([4.0, 4.0, 1.5]) + torch.tensor([1.5, 1.5, 1.0])).tolist()
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

    from camjobs.decode import load_image
    from camjobs.localize import encode_png, localize

    paths, default = image_paths(ctx.data)[:100], reduced_default()
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        res.update(images=len(paths), load_image_reduced_default=default)
        full = {} if default is None else {"reduced_decode": False}
        res["decode_full_ms"] = per_image_ms(lambda p: load_image(p, input_size=SIZE, **full), paths)
        try:
            res["decode_reduced_ms"] = per_image_ms(lambda p: load_image(p, input_size=SIZE, reduced_decode=True), paths)
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

    from camjobs.decode import load_image

    paths, forward = image_paths(ctx.data)[:1024], bf16_forward(ctx.device, ctx.batch)
    decode_s = model_s = 0.0
    started = time.perf_counter()
    for first in range(0, len(paths), ctx.batch):
        t0 = time.perf_counter()
        pixels = np.stack([load_image(p, input_size=SIZE).pixels for p in paths[first : first + ctx.batch]])
        t1 = time.perf_counter()
        forward(pixels)
        decode_s, model_s = decode_s + t1 - t0, model_s + time.perf_counter() - t1
    elapsed = time.perf_counter() - started
    res.update(images=len(paths), batch=ctx.batch, load_image_reduced_default=reduced_default(), seconds=round(elapsed, 3),
               images_per_s=round(len(paths) / elapsed, 2), decode_s=round(decode_s, 3), model_s=round(model_s, 3),
               peak_rss_mib=maxrss_mib())


def step_bare_parallel(ctx, res: dict) -> None:
    import functools

    import numpy as np

    from camjobs.decode import load_image

    paths, forward = image_paths(ctx.data), bf16_forward(ctx.device, ctx.batch)
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
    steady = (len(paths) - first_n) / (ended - first_end) if len(paths) > first_n else None
    res.update(images=len(paths), workers=workers, batch=ctx.batch, seconds=round(ended - started, 3),
               images_per_s=round(len(paths) / (ended - started), 2), first_batch_after_s=round(first_end - started, 3),
               steady_images_per_s=steady and round(steady, 2), peak_rss_mib=maxrss_mib())


class Sampler(threading.Thread):
    """Peak RSS summed over this session's processes (driver + local Ray cluster); GPU use via nvidia-smi."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop_event, self.sid, self.peak_sum, self.peak_one = threading.Event(), os.getsid(0), 0, 0
        self.gpu = [] if shutil.which("nvidia-smi") else None

    def run(self) -> None:
        for tick in itertools.count():
            rss = [r for s, r in proc_table().values() if s == self.sid]
            self.peak_sum, self.peak_one = max(self.peak_sum, sum(rss)), max([self.peak_one, *rss])
            if self.gpu is not None and tick % 2 == 0:
                line = (nvidia_smi("utilization.gpu,memory.used", units=False) or ["nan, nan"])[0]
                try:
                    self.gpu.append([float(v) for v in line.split(",")[:2]])
                except ValueError:  # "[N/A]" on some boards
                    pass
            if self.stop_event.wait(0.5):
                return

    def stop(self) -> dict:
        self.stop_event.set()
        self.join()
        out = {"tree_peak_rss_mib": round(self.peak_sum / 2**20, 1), "largest_process_peak_rss_mib": round(self.peak_one / 2**20, 1)}
        samples = [s for s in self.gpu or [] if s[0] == s[0]]  # drop NaN (a failed query)
        if samples:
            out.update(gpu_util_mean=round(sum(s[0] for s in samples) / len(samples), 1), gpu_util_max=max(s[0] for s in samples),
                       gpu_memory_used_peak_mib=max(s[1] for s in samples), gpu_samples=len(samples))
        return out


def worker_main(spec: dict) -> None:
    """One `camjobs run` (run_job with a RunConfig, as the CLI calls it) in this fresh process."""
    imports_started = time.time()
    import ray

    import camjobs.job as job
    from camjobs.config import RunConfig

    os.environ.pop("RAY_ADDRESS", None)
    shutil.rmtree(spec["output"], ignore_errors=True)
    cfg = RunConfig(data=spec["data"], output=spec["output"], model=ARCH, classes=CLASSES, input_size=SIZE, method=spec["method"],
                    actors=spec["actors"], gpus_per_actor=spec["gpus_per_actor"], batch_size=spec["batch_size"])
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench  # its timed stage wrapper: one log line per localize batch, for the steady-state rate
    import schedule

    # Ray Data logs each operator's budget, queues and running tasks every few seconds at DEBUG.
    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.DEBUG)

    stage_log = spec["output"].rstrip("/") + ".stages.jsonl"
    Path(stage_log).unlink(missing_ok=True)
    job.localize_batch = bench.timed_localize(stage_log)
    context = ray.data.DataContext.get_current()
    for key, value in (spec.get("settings") or {}).items():
        if key.startswith("cfg."):
            cfg = dataclasses.replace(cfg, **{key[4:]: value})
        elif key == "split_before_localize":
            schedule.split_before_localize(value)
        elif key.startswith("job."):
            assert hasattr(job, key[4:]), key
            setattr(job, key[4:], value)
        else:
            assert hasattr(context, key), key
            setattr(context, key, value)
    sampler = Sampler()
    sampler.start()
    started = time.time()
    result = job.run_job(cfg)
    finished = time.time()
    # Ray Data's own log (per-operator budgets and backpressure, at DEBUG level) for the analysis.
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    with open(spec["output"].rstrip("/") + ".ray-data.log", "wb") as copy:
        for part in sorted((session / "logs" / "ray-data").glob("*.log")):
            copy.write(part.read_bytes())
    ray.shutdown()
    steady = steady_rate([json.loads(line) for line in open(stage_log)]) if os.path.exists(stage_log) else None
    out = {"exit_code": result.exit_code, "message": result.message, "counts": result.summary["counts"],
           "timings": result.summary["timings"], "throughput": result.summary["throughput"], "actors": result.summary["actors"],
           "imports_s": round(started - imports_started, 3), "run_job_s": round(finished - started, 3),
           "ray_shutdown_s": round(time.time() - finished, 3), "driver_peak_rss_mib": maxrss_mib(),
           "steady_images_per_s": steady, **sampler.stop()}
    shutil.rmtree(spec["output"], ignore_errors=True)
    print("GPU-RESULT " + json.dumps(out), flush=True)


def steady_rate(batches: list[dict]) -> float | None:
    """Images finished per second between the 10th and the last localize batch (start-up ramp excluded)."""
    ends = sorted((b["end"], b["n"]) for b in batches)
    if len(ends) < 12:
        return None
    first = ends[9][0]
    done = sum(n for end, n in ends[10:])
    return round(done / (ends[-1][0] - first), 2) if ends[-1][0] > first else None


def run_child(ctx, name: str, spec: dict, timeout: float) -> dict:
    """The variant in a child process in its own session; on timeout the whole session is killed."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    log_path = Path(ctx.args.work) / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started, killed = time.time(), False
    with open(log_path, "w") as log_file:
        child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], env=env,
                                 stdout=subprocess.PIPE, stderr=log_file, text=True, start_new_session=True)
        try:
            stdout, _ = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_session(child.pid)
            stdout, _ = child.communicate()
            killed = True
    out = {"wall_s": round(time.time() - started, 3), "returncode": child.returncode, "log": str(log_path),
           "leftover_processes_killed": kill_session(child.pid), "children_maxrss_mib": maxrss_mib(resource.RUSAGE_CHILDREN)}
    line = next((l for l in stdout.splitlines() if l.startswith("GPU-RESULT ")), None)
    if killed or child.returncode != 0 or line is None:
        out["status"] = f"killed after {timeout:.0f} s" if killed else f"failed (exit {child.returncode})"
        out["error"] = log_path.read_text(errors="replace")[-3000:]
        return out
    out.update(json.loads(line.removeprefix("GPU-RESULT ")), status="ok")
    out["images_per_s"] = round(out["counts"]["inputs"] / out["wall_s"], 2)  # spawn to exit: start-up included
    return out


def step_jobs(ctx, res: dict) -> None:
    if ctx.device.type == "cuda":  # give back what the earlier steps' caching allocator holds
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()
    on_gpu = ctx.device.type == "cuda"
    chosen = ctx.args.jobs.split(",") if ctx.args.jobs else [name for name, *_ in JOBS]
    known = {name: (method, actors, share, {}) for name, method, actors, share in JOBS} | EXPERIMENTS
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise ValueError(f"unknown --jobs variant(s) {', '.join(unknown)}; known: {', '.join(known)}")
    for name in chosen:
        method, actors, share, settings = known[name]
        left = ctx.args.time_budget - (time.time() - START)
        if left < ESTIMATE_S["jobs"]:
            res[name] = {"status": "skipped: time budget"}
            continue
        spec = {"data": str(ctx.data), "output": str(Path(ctx.args.work) / "jobs" / name), "method": method,
                "actors": actors if on_gpu else min(actors, 2), "gpus_per_actor": share if on_gpu else None,
                "batch_size": ctx.args.job_batch_size or None, "settings": settings}
        res[name] = {"spec": spec, **run_child(ctx, name, spec, min(JOB_TIMEOUT_S, left))}
        log(f"      {name}: {res[name]['status']}, {res[name].get('images_per_s', '-')} images/s, {res[name]['wall_s']:.0f} s")
        ctx.save()
    bad = [n for n, r in res.items() if r["status"] not in ("ok", "skipped: time budget")]
    if bad:
        raise RuntimeError(f"job variant(s) failed: {', '.join(bad)} (see their 'error' and 'log')")


# --------------------------------------------------------------------------- Markdown


def num(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def ratio(a, b) -> float | None:
    return a / b if a and b else None


def verdict(value: float | None, bound: float, higher_is_better: bool = True) -> str:
    if value is None:
        return "not measured"
    met = value >= bound if higher_is_better else value <= bound
    return f"{'met' if met else 'missed'} by {abs(value - bound) / bound:.0%} (bound {bound:,g})"


def render(state: dict) -> str:
    steps = state["steps"]
    machine, data, fwd, stages, loop, par, jobs = (steps.get(s, {}).get("result") or {} for s in STEPS[:7])
    ref, ceiling = (fwd.get("bf16") or {}).get("images_per_s"), par.get("images_per_s")
    gpu = machine.get("gpu") or "no GPU (CPU only)"
    out = [f"## {machine.get('date_utc', state['started_at'])}: {gpu}, {ARCH} at {SIZE} px, {state['args']['images']:,} images (600x450 JPEG)", ""]
    if not state.get("finished"):
        out += [f"**Incomplete**: written after step `{state.get('last_step')}`; the run did not reach its end.", ""]
    out.append(f"- Command: `{state['command']}`")
    if machine.get("versions"):
        gpu_line = f"{gpu} ({machine['gpu_memory_gib']} GiB, CUDA {machine['cuda']}, cuDNN {machine['cudnn']})" if machine.get("gpu") else gpu
        out += [f"- Machine: {gpu_line}; nvidia-smi: {'; '.join(machine['nvidia_smi'] or []) or 'not present'}; {machine['cpu']}, "
                f"{machine['cores']} cores ({machine.get('usable_cores', '?')} usable), {machine['ram_gib']} GiB RAM, /dev/shm "
                f"{machine.get('dev_shm_gib', '?')} GiB; raylet processes already running: {machine['raylets_running_before']}",
                "- Versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items())]
    out += [f"- Model: {ARCH} ({','.join(CLASSES)}), untrained seeded weights (same FLOPs as trained)" + (
                f"; batch {fwd['batch']} on {fwd['device']} in the forward and bare steps; torch defaults (cudnn.benchmark "
                f"{fwd['cudnn_benchmark']}, cuDNN TF32 {fwd['cudnn_tf32']}, matmul TF32 {fwd['matmul_tf32']})" if fwd else ""),
            f"- Raw figures: `{state['json']}`; steps: " + ", ".join(f"{n} {s['status']}" for n, s in steps.items())]
    if "path" in data:
        out.append(f"- Data: {data['images']:,} JPEGs, {data['unique']:,} synthesized, the rest copies; "
                   + ("reused" if data["reused"] else f"made in {data['seconds']} s ({data['synth_processes']} processes)"))
    out += ["", "| figure | images/s | x bare bf16 forward | x bare-parallel | peak memory |", "| --- | ---: | ---: | ---: | --- |"]

    def row(label, value, memory="-"):
        out.append(f"| {label} | {num(value)} | {num(ratio(value, ref), 2)} | {num(ratio(value, ceiling), 2)} | {memory} |")

    for key, label in (("fp32", "forward, fp32"), ("bf16_unfolded", "bf16 forward (autocast + channels_last), BatchNorms not folded"),
                       ("bf16", "**bare bf16 forward** (autocast + channels_last, BatchNorms folded as in the job)"),
                       ("cam", "CAM extractor, bf16 + channels_last"), ("gradcam", "Grad-CAM extractor, bf16 + channels_last"),
                       ("device_decode", "JPEG decode + orient + resize on the device (--decode-on gpu), one batch")):
        if key in fwd:
            row(label, fwd[key]["images_per_s"], f"GPU {fwd[key]['gpu_peak_mib']:,.0f} MiB" if "gpu_peak_mib" in fwd[key] else "-")
    if loop:
        row(f"bare-loop: 1 process, decode + bf16 forward, {loop['images']:,} images", loop["images_per_s"], f"process {loop['peak_rss_mib']:,.0f} MiB")
    if par:
        row(f"bare-parallel: {par['workers']} decode worker(s) + bf16 forward, end to end", par["images_per_s"], f"process {par['peak_rss_mib']:,.0f} MiB")
        row("bare-parallel after its first batch", par["steady_images_per_s"])
    for name, job in jobs.items():
        if job["status"] != "ok":
            last = (job.get("error") or "").strip().splitlines()[-1:] or [""]
            out.append(f"| {name}: {job['status']} {last[0][:200].replace(chr(124), chr(47))} | - | - | - | - |")
            continue
        plan, memory = job["actors"], f"driver {job['driver_peak_rss_mib']:,.0f} MiB, all {job['tree_peak_rss_mib']:,.0f} MiB"
        if "gpu_memory_used_peak_mib" in job:
            memory += f", GPU {job['gpu_memory_used_peak_mib']:,.0f} MiB used, {job['gpu_util_mean']:.0f}% util (mean)"
        row(f"{name}: {plan['actors']} actor(s) x {plan['num_gpus']:g} GPU, batch {plan['batch_size']}, end to end", job["images_per_s"], memory)
        row(f"{name}: pipeline (Ray start excluded)", job["throughput"]["pipeline_images_per_s"])
        row(f"{name}: steady state (localize batches 10 to last)", job.get("steady_images_per_s"))
    out += ["", "Peak memory: forward = torch.cuda.max_memory_allocated; bare = the script's process (getrusage, peak so far); "
            "jobs = the driver (getrusage) and all processes of the child's session (RSS summed, shared pages counted in each; "
            "sampled every 0.5 s), GPU memory and utilization from nvidia-smi every 1 s. Job end to end = inputs / child "
            "process wall time (Python start, imports, Ray start and shutdown included).", ""]
    ok = {n: j for n, j in jobs.items() if j["status"] == "ok"}
    for name, job in ok.items():
        t, c = job["timings"], job["counts"]
        out.append(f"- {name}: child {job['wall_s']:.1f} s = imports {job['imports_s']:.1f} + run_job {job['run_job_s']:.1f} (list+load "
                   f"{t['list_and_load_s']:.1f}, ray.init {t['ray_init_s']:.1f}, pipeline {t['pipeline_s']:.1f}) + ray.shutdown "
                   f"{job['ray_shutdown_s']:.1f} + start/exit; {c['processed']:,} processed, {c['errors']:,} errors, exit code {job['exit_code']}")
    out += [""] if ok else []
    out += ["| target | measured | verdict |", "| --- | --- | --- |"]
    cam, grad = ok.get("job-cam"), ok.get("job-gradcam")
    e2e, pipe = (lambda j: j["images_per_s"]), (lambda j: j["throughput"]["pipeline_images_per_s"])
    steady = lambda j: j.get("steady_images_per_s")  # noqa: E731
    for kind, pick in (("end to end", e2e), ("pipeline", pipe), ("steady state", steady)):
        value = pick(cam) if cam else None
        out.append(f"| job-cam >= {TARGET_FORWARD_RATIO} x bare bf16 forward ({kind}) | {num(ratio(value, ref), 2)} x | "
                   f"{verdict(ratio(value, ref), TARGET_FORWARD_RATIO)} |")
        out.append(f"| job-cam >= {TARGET_RATE:,.0f} images/s ({kind}) | {num(value)} images/s | {verdict(value, TARGET_RATE)} |")
    costs = [("extractors", ratio((fwd.get("cam") or {}).get("images_per_s"), (fwd.get("gradcam") or {}).get("images_per_s")))]
    costs += [(f"jobs, {kind}", ratio(pick(cam), pick(grad)) if cam and grad else None) for kind, pick in (("end to end", e2e), ("pipeline", pipe))]
    for what, cost in costs:
        out.append(f"| Grad-CAM time <= {GRADCAM_MAX_COST} x CAM time ({what}) | {num(cost, 2)} x | {verdict(cost, GRADCAM_MAX_COST, False)} |")
    for name in ("job-cam-2x0.5", "job-cam-4x0.25"):
        steady = lambda j: j.get("steady_images_per_s")  # noqa: E731
    for kind, pick in (("end to end", e2e), ("pipeline", pipe), ("steady state", steady)):
            value = ratio(pick(ok[name]), pick(cam)) if cam and name in ok else None
            out.append(f"| {name} >= {SCALING_MIN} x job-cam ({kind}) | {num(value, 2)} x | {verdict(value, SCALING_MIN)} |")
    out += ["", f"job-cam >= {TARGET_FORWARD_RATIO} x the bare bf16 forward and >= {TARGET_RATE:,.0f} images/s are the issue's GPU "
            f"targets; the Grad-CAM bound ({GRADCAM_MAX_COST}, bench.py's CPU target) and the scaling bound ({SCALING_MIN}: actors "
            "sharing the GPU no slower than one) are this script's.", ""]
    if stages.get("png_ms") is not None:
        reduced = stages.get("decode_reduced_ms")
        gpu_loc = f", {stages['localize_gpu_ms']} on a GPU tensor (as in the actor)" if "localize_gpu_ms" in stages else ""
        out += [f"Stage costs, ms per image on one core (torch and OpenCV threads 1), mean of {stages['images']} images: load_image "
                f"{stages['decode_full_ms']} with full decode, {num(reduced, 3) if reduced is not None else 'not available'} with reduced decode "
                f"(load_image's default: reduced_decode={stages['load_image_reduced_default']}); localize {stages['localize_cpu_ms']} on a CPU "
                f"tensor{gpu_loc}; encode_png {stages['png_ms']} ({stages['png_kib']} KiB). Maps: smooth 7x7 bumps, 450x600 output.", ""]
        cores = machine.get("cores") or os.cpu_count()
        for label, decode in (("full decode", stages["decode_full_ms"]), ("reduced decode", reduced)):
            if decode is not None:
                per = decode + stages["localize_cpu_ms"] + stages["png_ms"]
                out.append(f"- CPU-core ceiling, {label}: {cores} cores / ({decode} + {stages['localize_cpu_ms']} + {stages['png_ms']} ms) "
                           f"x 1000 = {cores / per * 1000:,.0f} images/s")
        out.append("")
    for name, step in steps.items():
        if step.get("error"):
            out += [f"Step `{name}` failed:", "", "```", step["error"].strip()[-1500:], "```", ""]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- driver


class Context:
    def __init__(self, args):
        import torch

        self.args, self.data, self._pool, self._md_prefix = args, None, None, None
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.batch = args.batch or (256 if self.device.type == "cuda" else 16)
        self.state = {"started_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "json": args.json,
                      "command": "python " + shlex.join(sys.argv), "args": vars(args), "steps": {}}

    def pool_context(self):
        """forkserver: pool workers inherit neither this process's CUDA context nor its OpenMP threads."""
        import multiprocessing

        if self._pool is None:
            self._pool = multiprocessing.get_context("forkserver")
            self._pool.set_forkserver_preload(["camjobs.decode", "camjobs.synth"])
        return self._pool

    def save(self) -> None:
        atomic_write(self.args.json, json.dumps(self.state, indent=1, default=str))

    def save_markdown(self) -> None:
        if not self.args.results or "render" not in self.args.steps:
            return
        path = Path(self.args.results)
        if self._md_prefix is None:  # the file as it was before this run; our section goes after it
            self._md_prefix = path.read_text() if path.is_file() else (
                "# camjobs GPU throughput\n\nWritten by `benchmarks/gpu.py`, one section per run on a GPU machine, newest last; "
                "each section names the JSON file that holds its raw figures.\n")
        try:
            section = render(self.state)
        except Exception:  # a rendering bug must not cost the run: the figures are in the JSON file
            log("render failed; every figure is in the JSON file")
            section = f"## {self.state['started_at']}: rendering failed\n\nSee `{self.args.json}`.\n\n```\n{traceback.format_exc()[-2000:]}```\n"
        atomic_write(path, self._md_prefix.rstrip("\n") + "\n\n" + section)


def atomic_write(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--unique", type=int, default=1024)
    parser.add_argument("--work", default="/tmp/gpubench")
    parser.add_argument("--json", default="gpu.json")
    parser.add_argument("--results", default="benchmarks/results-gpu.md", help="Markdown file to append to ('' for none)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"a comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--time-budget", type=float, default=330.0, help="skip steps that would end later (seconds from start)")
    parser.add_argument("--batch", type=int, default=0, help="forward batch (default 256 on a GPU, 16 on CPUs)")
    parser.add_argument("--job-batch-size", type=int, default=0, help="the jobs' batch_size (default: the job's own)")
    parser.add_argument("--jobs", default="", help="comma-separated job variants [default: the four standard ones]; "
                        "experiments: " + ", ".join(EXPERIMENTS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(json.loads(args.worker))
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if set(args.steps) - set(STEPS):
        parser.error(f"unknown step(s) {', '.join(sorted(set(args.steps) - set(STEPS)))}; steps: {', '.join(STEPS)}")
    if args.images < 1 or args.unique < 1:
        parser.error("--images and --unique must be >= 1")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    ctx = Context(args)
    functions = {"machine": step_machine, "data": step_data, "forward": step_forward, "stages": step_stages,
                 "bare-loop": step_bare_loop, "bare-parallel": step_bare_parallel, "jobs": step_jobs}
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
                    ctx.data = make_dataset(ctx, {})
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
    log(f"[7] render: {args.results if 'render' in args.steps and args.results else 'not written'}; JSON {args.json}; "
        f"done in {ctx.state['total_s']} s")


if __name__ == "__main__":
    main()
