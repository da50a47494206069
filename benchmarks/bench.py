"""Throughput of camjobs against the model's own limit and against torchcam / pytorch-grad-cam.

One command measures, on the same images and the same model (same seeded weights):

  bare         (a) read + decode + resize (camjobs.decode.load_image) and the model's forward in a
               plain loop: one process, batches like the job's, torch threads = all cores,
               torch.inference_mode, the model prepared as the job runs it
               (camjobs.models.prepare_for_inference: BatchNorms folded, channels_last). The
               limit for that model on this machine.
  bare-unfolded  the same loop with the model as loaded (BatchNorms not folded): what the
               preparation gains.
  job-cam      (b) `camjobs run` end to end (camjobs.job.run_job) in a fresh process, so Python
               start-up, imports, Ray start-up and shutdown are all included; plus its
               steady-state rate (images finished after the model actor's first batch).
  torchcam     (c) torchcam.methods.CAM on the same model + camjobs.localize.localize.
  gradcam-lib  (d) pytorch_grad_cam.GradCAM (target layer model.layer4[-1], targets = the predicted
               class) + camjobs.localize.localize.
  cj-cam       camjobs' own extractor (build_extractor("cam")) in the same plain loop as (c), (d).
  cj-gradcam   camjobs' own extractor (build_extractor("gradcam")) in the same plain loop.
               Every loop but bare-unfolded, (c) and (d) included, gets the prepared model, so
               that the ratios compare methods, not model preparations.
  job-gradcam  `camjobs run --method gradcam` end to end, like job-cam.
  job-cli      (optional, not in the default list) the real `camjobs run` command line, without
               any instrumentation: a check that the instrumented job-* runs are representative.

Every variant runs in its own child process (so its peak RSS is its own) and prints one JSON
line; the parent prints a table and appends a dated section to benchmarks/results-cpu.md.

The job-* variants call camjobs.job.run_job with a RunConfig, exactly as `camjobs run` does, with
two thin timing wrappers put in place in the driver before the run: a subclass of CamPredictor that
logs each batch's start/end (and the time spent in the extractor, localize and encode_png) and a
wrapper of decode_batch that logs each decode batch. Both are pickled by value to the Ray workers
and add microseconds per batch. A psutil sampler in the driver follows every process below it
(raylet, GCS, task workers, the model actor) for peak RSS and CPU seconds per role.

    .venv/bin/python benchmarks/bench.py --images 1024 --model resnet50 --input-size 224
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_VARIANTS = ("bare", "bare-unfolded", "job-cam", "cj-cam", "cj-gradcam", "torchcam", "gradcam-lib", "job-gradcam", "paired")
ALL_VARIANTS = DEFAULT_VARIANTS + ("job-cli",)
LABELS = {
    "bare": "(a) decode+resize+forward, plain loop",
    "bare-unfolded": "(a) with the model as loaded (BatchNorms not folded)",
    "job-cam": "(b) camjobs run --method cam, end to end",
    "torchcam": "(c) torchcam CAM + localize",
    "gradcam-lib": "(d) pytorch-grad-cam GradCAM + localize",
    "cj-cam": "camjobs CAM extractor + localize, plain loop",
    "cj-gradcam": "camjobs GradCAM extractor + localize, plain loop",
    "job-gradcam": "camjobs run --method gradcam, end to end",
    "job-cli": "`camjobs run` CLI, uninstrumented",
    "paired": "all plain-loop methods on each batch in turn, one process",
}
PROCESS_START = time.time()


# --------------------------------------------------------------------------- data


def dataset_dir(cache: Path, images: int, width: int, height: int) -> Path:
    """A cached synthetic HAM10000-layout dataset of exactly `images` JPEGs (made once)."""
    from camjobs.synth import synth_dataset

    target = cache / f"ham10000-n{images}-{width}x{height}"
    if (target / "HAM10000_metadata.csv").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache))
    print(f"bench: generating {images} synthetic {width}x{height} JPEGs into {target} ...", file=sys.stderr, flush=True)
    started = time.time()
    synth_dataset(scratch, n=images, width=width, height=height)
    try:
        scratch.rename(target)
    except OSError:  # another bench made it meanwhile
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"bench: generated in {time.time() - started:.1f} s", file=sys.stderr, flush=True)
    return target


# --------------------------------------------------------------------------- in-process loops


def _rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def build_method(variant: str, model, size: int):
    """A function from a normalized (B, 3, H, W) batch to (B, h, w) maps (any scale), or None for (a)."""
    import torch

    if variant in ("bare", "bare-unfolded"):
        def method(images):
            with torch.inference_mode():
                model(images)
            return None
    elif variant in ("cj-cam", "cj-gradcam"):
        from camjobs.cam import build_extractor

        extractor = build_extractor(variant.removeprefix("cj-"), model, probe_size=size)

        def method(images):
            with torch.inference_mode():  # as the actor runs: the extractors handle grad themselves
                return extractor(images).maps
    elif variant == "torchcam":
        from torchcam.methods import CAM

        from camjobs.cam import locate_head

        head = locate_head(model, probe_size=size)
        extractor = CAM(model, target_layer=head.target_name, fc_layer=head.classifier_name, input_shape=(3, size, size))

        def method(images):
            with torch.inference_mode():
                logits = model(images)
            return extractor(class_idx=logits.argmax(dim=1).tolist())[0]
    elif variant == "gradcam-lib":
        from pytorch_grad_cam import GradCAM

        if hasattr(model, "layer4"):
            layer = model.layer4[-1]
        else:
            from camjobs.cam import locate_head

            layer = model.get_submodule(locate_head(model, probe_size=size).target_name)
        extractor = GradCAM(model=model, target_layers=[layer])

        def method(images):
            return torch.from_numpy(extractor(input_tensor=images, targets=None))  # None: the predicted class
    else:
        raise SystemExit(f"unknown loop variant {variant}")
    return method


PAIRED = ("bare", "cj-cam", "cj-gradcam", "torchcam", "gradcam-lib")


def run_paired(args) -> dict:
    """Every loop method on every batch, in rotating order, in one process: ratios under the same load.

    Each method gets its own copy of the model (camjobs' gradcam turns parameter gradients off,
    pytorch-grad-cam needs them on). Decode is done once per batch and timed once."""
    import copy

    import numpy as np
    import torch

    from camjobs.decode import load_image
    from camjobs.layouts import list_images
    from camjobs.localize import localize
    from camjobs.models import load_model, prepare_for_inference

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    records = [r for r in list_images(args.data).records if r.error_type is None][: args.paired_images]
    loaded = load_model(arch=args.model, classes=args.classes.split(","), input_size=args.input_size)
    size = loaded.input_size
    mean = torch.tensor(loaded.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std).view(1, 3, 1, 1)
    methods = {v: build_method(v, prepare_for_inference(copy.deepcopy(loaded.model)), size) for v in PAIRED}
    warm = np.random.default_rng(0).integers(0, 255, (args.batch_size, size, size, 3), dtype=np.uint8)

    def normalize(pixels):
        return (torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0) - mean) / std

    for method in methods.values():
        method(normalize(warm))
    model_s = {v: 0.0 for v in PAIRED}
    localize_s = {v: 0.0 for v in PAIRED}
    decode_s = 0.0
    load_start = os.getloadavg()[0]
    started = time.time()
    for index, first in enumerate(range(0, len(records), args.batch_size)):
        chunk = records[first : first + args.batch_size]
        t0 = time.perf_counter()
        decoded = [load_image(r.source_path, input_size=size) for r in chunk]
        images = normalize(np.stack([d.pixels for d in decoded]))
        decode_s += time.perf_counter() - t0
        order = PAIRED[index % len(PAIRED):] + PAIRED[: index % len(PAIRED)]
        for variant in order:
            t1 = time.perf_counter()
            maps = methods[variant](images.clone())
            t2 = time.perf_counter()
            if maps is not None:
                maps = maps.detach().float().cpu()
                for i, d in enumerate(decoded):
                    localize(maps[i], d.height, d.width)
            t3 = time.perf_counter()
            model_s[variant] += t2 - t1
            localize_s[variant] += t3 - t2
    return {
        "variant": "paired",
        "images": len(records),
        "seconds": time.time() - started,
        "images_per_s": len(records) / (time.time() - started),  # all five methods per image
        "decode_s": decode_s,
        "model_s": model_s,
        "localize_s": localize_s,
        "torch_threads": threads,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
    }


def run_loop(variant: str, args) -> dict:
    """(a), (c), (d), cj-cam, cj-gradcam: read/decode/resize, then the model, then boxes, batch by batch."""
    import numpy as np
    import torch

    from camjobs.decode import load_image
    from camjobs.layouts import list_images
    from camjobs.localize import localize
    from camjobs.models import load_model, prepare_for_inference

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    setup_started = time.time()
    records = [r for r in list_images(args.data).records if r.error_type is None]
    loaded = load_model(arch=args.model, classes=args.classes.split(","), input_size=args.input_size)
    model = loaded.model.eval() if variant == "bare-unfolded" else prepare_for_inference(loaded.model)
    size = loaded.input_size
    mean = torch.tensor(loaded.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std).view(1, 3, 1, 1)

    def normalize(pixels: np.ndarray) -> torch.Tensor:  # as CamPredictor._normalize
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)
        return (images - mean) / std

    method = build_method(variant, model, size)

    # One untimed warm-up batch: oneDNN primitive creation, allocator growth.
    warm = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (args.batch_size, size, size, 3), dtype=np.uint8))
    method(normalize(warm.numpy()))
    setup_s = time.time() - setup_started

    load_start = os.getloadavg()[0]
    cpu_before = _cpu_s()
    timings = {"decode_s": 0.0, "model_s": 0.0, "localize_s": 0.0}
    boxes = 0
    started = time.time()
    for first in range(0, len(records), args.batch_size):
        chunk = records[first : first + args.batch_size]
        t0 = time.perf_counter()
        decoded = [load_image(r.source_path, input_size=size) for r in chunk]
        pixels = np.stack([d.pixels for d in decoded])
        t1 = time.perf_counter()
        maps = method(normalize(pixels))
        t2 = time.perf_counter()
        if maps is not None:
            maps = maps.detach().float().cpu()
            for i, d in enumerate(decoded):
                boxes += len(localize(maps[i], d.height, d.width).boxes)
        t3 = time.perf_counter()
        timings["decode_s"] += t1 - t0
        timings["model_s"] += t2 - t1
        timings["localize_s"] += t3 - t2
    elapsed = time.time() - started
    return {
        "variant": variant,
        "images": len(records),
        "seconds": elapsed,
        "images_per_s": len(records) / elapsed,
        "setup_s": setup_s,
        "cpu_s": _cpu_s() - cpu_before,
        "peak_rss_kib": _rss_kib(),
        "torch_threads": threads,
        "boxes": boxes,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        **{k: round(v, 3) for k, v in timings.items()},
    }


# --------------------------------------------------------------------------- the Ray job


def timed_predictor(log_path: str):
    """CamPredictor that logs its batches; defined in a function so cloudpickle ships it by value."""
    from camjobs.predictor import CamPredictor

    class TimedCamPredictor(CamPredictor):
        def __init__(self, *args, **kwargs):
            started = time.time()
            super().__init__(*args, **kwargs)
            self._bench_acc = {"extractor_s": 0.0}
            acc = self._bench_acc

            def timed(fn, key):
                def wrapper(*a, **k):
                    t = time.perf_counter()
                    try:
                        return fn(*a, **k)
                    finally:
                        acc[key] += time.perf_counter() - t

                return wrapper

            self.extractor = timed(self.extractor, "extractor_s")
            self._bench_log = open(log_path, "a")
            self._bench_write({"kind": "actor_init", "start": started, "end": time.time(),
                               "torch_threads": __import__("torch").get_num_threads()})

        def _bench_write(self, record: dict) -> None:
            record["pid"] = os.getpid()
            self._bench_log.write(json.dumps(record) + "\n")
            self._bench_log.flush()

        def __call__(self, batch):
            start = time.time()
            before = dict(self._bench_acc)
            table = super().__call__(batch)
            record = {"kind": "predict", "start": start, "end": time.time(), "n": len(batch["image_id"])}
            record.update({k: self._bench_acc[k] - before[k] for k in before})
            self._bench_write(record)
            return table

    return TimedCamPredictor


def timed_stage(log_path: str, kind: str, stage):
    """A CPU stage function (decode_batch, localize_batch) that logs each batch it runs."""

    def timed(batch, **kwargs):
        start = time.time()
        table = stage(batch, **kwargs)
        with open(log_path, "a") as log:
            log.write(json.dumps({"kind": kind, "pid": os.getpid(), "start": start, "end": time.time(),
                                  "n": len(batch["image_id"])}) + "\n")
        return table

    timed.__name__ = f"timed_{stage.__name__}"
    return timed


def timed_decode(log_path: str):
    from camjobs.decode import decode_batch

    return timed_stage(log_path, "decode", decode_batch)


def timed_localize(log_path: str):
    from camjobs.localize import localize_batch

    return timed_stage(log_path, "localize", localize_batch)


class ProcessSampler(threading.Thread):
    """Peak RSS and CPU seconds of this process and everything below it, sampled every `interval` s."""

    def __init__(self, interval: float = 1.0):
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.interval = interval
        self.stop_event = threading.Event()
        self.procs: dict[int, dict] = {}  # pid -> {name, peak_rss, peak_private, cpu, first_seen}
        self.samples: list[tuple[float, dict[int, int]]] = []

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def sample(self) -> None:
        psutil = self.psutil
        now = time.time()
        rss_now: dict[int, int] = {}
        try:
            tree = [self.me] + self.me.children(recursive=True)
        except psutil.Error:
            return
        for proc in tree:
            try:
                with proc.oneshot():
                    mem = proc.memory_info()
                    cpu = proc.cpu_times()
                    name = " ".join(proc.cmdline()[:2])[:120] if proc.pid != self.me.pid else "driver"
            except psutil.Error:
                continue
            info = self.procs.setdefault(proc.pid, {"names": set(), "peak_rss": 0, "peak_private": 0, "cpu": 0.0})
            info["names"].add(name)
            info["peak_rss"] = max(info["peak_rss"], mem.rss)
            info["peak_private"] = max(info["peak_private"], mem.rss - getattr(mem, "shared", 0))
            info["cpu"] = max(info["cpu"], cpu.user + cpu.system)
            rss_now[proc.pid] = mem.rss
        self.samples.append((now, rss_now))

    def stop(self) -> None:
        self.stop_event.set()
        self.join()
        self.sample()


def _role(pid: int, names: set[str], actor_pids: set[int], decode_pids: set[int], driver_pid: int) -> str:
    joined = " ".join(names)
    if pid == driver_pid:
        return "driver"
    if pid in actor_pids:
        return "model actor"
    if "raylet" in joined:
        return "raylet"
    if "gcs_server" in joined:
        return "gcs"
    if pid in decode_pids:
        return "decode/write workers"
    if "ray::" in joined or "default_worker" in joined:
        return "other ray workers"
    return "other ray processes"


def run_job_variant(variant: str, args) -> dict:
    """job-cam / job-gradcam: camjobs.job.run_job as `camjobs run` calls it, instrumented."""
    imports_started = time.time()
    import camjobs.job as job
    from camjobs.config import RunConfig

    imported = time.time()
    os.environ.pop("RAY_ADDRESS", None)
    out = Path(args.scratch) / f"{variant}-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log_path = str(out / "bench-log.jsonl")
    job.CamPredictor = timed_predictor(log_path)
    job.decode_batch = timed_decode(log_path)
    job.localize_batch = timed_localize(log_path)
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
    sampler = ProcessSampler()
    sampler.start()
    load_start = os.getloadavg()[0]
    run_started = time.time()
    result = job.run_job(cfg)
    run_finished = time.time()
    import ray

    ray.shutdown()
    shut = time.time()
    sampler.stop()

    records = [json.loads(line) for line in open(log_path)]
    predicts = sorted((r for r in records if r["kind"] == "predict"), key=lambda r: r["end"])
    decodes = [r for r in records if r["kind"] == "decode"]
    inits = [r for r in records if r["kind"] == "actor_init"]
    actor_pids = {r["pid"] for r in inits}
    decode_pids = {r["pid"] for r in decodes}
    images = result.summary["counts"]["inputs"]
    first_end = predicts[0]["end"]
    after_first = sum(r["n"] for r in predicts if r["end"] > first_end)
    last_end = predicts[-1]["end"]
    busy = sum(r["end"] - r["start"] for r in predicts)
    # per-role peak RSS (sum over the role's processes at one sample) and CPU seconds
    roles: dict[str, dict] = {}
    role_of = {pid: _role(pid, info["names"], actor_pids, decode_pids, os.getpid()) for pid, info in sampler.procs.items()}
    for pid, info in sampler.procs.items():
        role = roles.setdefault(role_of[pid], {"processes": 0, "peak_rss_kib": 0, "cpu_s": 0.0, "peak_private_kib": 0})
        role["processes"] += 1
        role["cpu_s"] += info["cpu"]
        role["peak_private_kib"] = max(role["peak_private_kib"], info["peak_private"] // 1024)
    for _, sample in sampler.samples:
        per_role: dict[str, int] = {}
        for pid, rss in sample.items():
            per_role[role_of.get(pid, "other ray processes")] = per_role.get(role_of.get(pid, "other ray processes"), 0) + rss
        for role, rss in per_role.items():
            roles[role]["peak_rss_kib"] = max(roles[role]["peak_rss_kib"], rss // 1024)
    tree_peak = max((sum(s.values()) for _, s in sampler.samples), default=0) // 1024
    sums = {k: sum(r.get(k, 0.0) for r in predicts) for k in ("extractor_s",)}
    localizes = [r for r in records if r["kind"] == "localize"]
    shutil.rmtree(out / "output", ignore_errors=True)
    return {
        "variant": variant,
        "images": images,
        "exit_code": result.exit_code,
        "message": result.message,
        "processed": result.summary["counts"]["processed"],
        "errors": result.summary["counts"]["errors"],
        "summary_timings": result.summary["timings"],
        "summary_throughput": result.summary["throughput"],
        "actors": result.summary["actors"],
        "imports_s": imported - imports_started,
        "process_to_import_s": imports_started - PROCESS_START,
        "run_job_s": run_finished - run_started,
        "ray_shutdown_s": shut - run_finished,
        "first_batch_after_s": first_end - run_started,
        "actor_init_s": [round(r["end"] - r["start"], 3) for r in inits],
        "actor_ready_after_s": [round(r["end"] - run_started, 3) for r in inits],
        "actor_torch_threads": [r["torch_threads"] for r in inits],
        "first_predict_start_after_s": min(r["start"] for r in predicts) - run_started,
        "steady_images_per_s": after_first / (last_end - first_end) if last_end > first_end else None,
        "actor_busy_fraction": busy / (sum(1 for _ in actor_pids) * (last_end - min(r["start"] for r in predicts))),
        "actor_busy_s": busy,
        "actor_extractor_s": sums["extractor_s"],
        "actor_other_s": busy - sum(sums.values()),
        "localize_batches": len(localizes),
        "localize_busy_s": sum(r["end"] - r["start"] for r in localizes),
        "predict_batches": len(predicts),
        "decode_batches": len(decodes),
        "decode_busy_s": sum(r["end"] - r["start"] for r in decodes),
        "decode_span_s": (max(r["end"] for r in decodes) - min(r["start"] for r in decodes)) if decodes else 0.0,
        "decode_processes": len(decode_pids),
        "driver_peak_rss_kib": _rss_kib(),
        "tree_peak_rss_kib": tree_peak,
        "roles": roles,
        "top_processes": [
            {"pid": pid, "role": role_of[pid], "name": next((n for n in sorted(info["names"]) if n.startswith("ray::") and "IDLE" not in n),
                         next((n for n in sorted(info["names"]) if "IDLE" not in n), "ray::IDLE"))[:80], "cpu_s": round(info["cpu"], 1),
             "peak_rss_kib": info["peak_rss"] // 1024}
            for pid, info in sorted(sampler.procs.items(), key=lambda kv: -kv[1]["cpu"])[:10]
        ],
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
    }


def run_cli_variant(args) -> dict:
    """job-cli: the plain `camjobs run` command, nothing patched; its own summary file for timings."""
    out = Path(args.scratch) / f"job-cli-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    command = [str(Path(sys.executable).with_name("camjobs")), "run", "--data", args.data, "--output", str(out),
               "--model", args.model, "--classes", args.classes, "--input-size", str(args.input_size)]
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
        "children_peak_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    }


def worker_main(args) -> None:
    if args.worker in ("job-cam", "job-gradcam"):
        result = run_job_variant(args.worker, args)
    elif args.worker == "job-cli":
        result = run_cli_variant(args)
    elif args.worker == "paired":
        result = run_paired(args)
    else:
        result = run_loop(args.worker, args)
    print("BENCH-RESULT " + json.dumps(result, default=lambda o: sorted(o) if isinstance(o, set) else str(o)), flush=True)


# --------------------------------------------------------------------------- the parent


class LoadSampler(threading.Thread):
    def __init__(self, interval: float = 5.0):
        super().__init__(daemon=True)
        self.interval, self.values, self.stop_event = interval, [], threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.values.append(os.getloadavg()[0])
            self.stop_event.wait(self.interval)

    def stop(self) -> list[float]:
        self.stop_event.set()
        self.join()
        return self.values


def run_script_child(script: str, args, extra: list[str], log_path: Path, what: str) -> dict:
    """A benchmark script's worker mode in a fresh process (no Ray cluster of the parent's);
    returns its BENCH-RESULT line with process_wall_s added. Shared with scaling.py."""
    command = [sys.executable, script, "--model", args.model,
               "--input-size", str(args.input_size), "--classes", args.classes, "--scratch", str(args.scratch)] + extra
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    started = time.time()
    with open(log_path, "w") as log:
        done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=log, text=True, cwd=str(ROOT))
    line = next((l for l in done.stdout.splitlines() if l.startswith("BENCH-RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"{what} failed (exit {done.returncode}); log {log_path}:\n{log_path.read_text()[-4000:]}")
    result = json.loads(line.removeprefix("BENCH-RESULT "))
    result["process_wall_s"] = time.time() - started
    return result


def run_child(variant: str, args, data: Path, log_dir: Path) -> dict:
    extra = ["--worker", variant, "--data", str(data), "--batch-size", str(args.batch_size)]
    for flag, value in (("--paired-images", args.paired_images), ("--threads", args.threads), ("--job-batch-size", args.job_batch_size), ("--actors", args.actors)):
        if value:
            extra += [flag, str(value)]
    result = run_script_child(str(Path(__file__).resolve()), args, extra, log_dir / f"{variant}.log", f"variant {variant}")
    if variant.startswith("job-"):
        # end to end, start-up included: from spawning the process to its exit
        result["seconds"] = result["process_wall_s"]
        result["images_per_s"] = result["images"] / result["process_wall_s"]
    return result


def machine_info() -> dict:
    import ray
    import torch
    import torchvision

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
                "ray": ray.__version__}
    for name, module in (("torchcam", "torchcam"), ("grad-cam", "pytorch_grad_cam")):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:
            versions[name] = "not installed"
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem_kib / 2**20, 1), "platform": platform.platform(),
            "versions": versions, "torch_threads_default": torch.get_num_threads()}


def _mib(kib: int | None) -> str:
    return "-" if not kib else f"{kib / 1024:,.0f} MiB"


def targets(res: dict[str, dict]) -> list[tuple[str, str, str]]:
    rows = []

    def rate(v):
        return res[v]["images_per_s"] if v in res else None

    if rate("job-cam") and rate("bare"):
        ratio = rate("job-cam") / rate("bare")
        steady = res["job-cam"].get("steady_images_per_s")
        detail = f"{ratio:.2f} x (a) end to end" + (f"; steady state {steady / rate('bare'):.2f} x (a)" if steady else "")
        if rate("bare-unfolded"):  # for reference: against the model as loaded, without the job's preparation
            detail += f"; {rate('job-cam') / rate('bare-unfolded'):.2f} x (a) with the model as loaded"
        verdict = "met" if ratio >= 0.9 else f"missed by {(0.9 - ratio) / 0.9:.0%} (needs {0.9 * rate('bare'):.2f} img/s, got {ratio * rate('bare'):.2f})"
        rows.append((f"(b) >= 0.9 x (a) at {res['job-cam']['images']:,} images, start-up included", detail, verdict))
    for pair, what in ((("cj-gradcam", "cj-cam"), "extractor loop"), (("job-gradcam", "job-cam"), "job end to end")):
        if rate(pair[0]) and rate(pair[1]):
            cost = rate(pair[1]) / rate(pair[0])
            detail = f"{cost:.2f} x ({what})"
            if pair[0] == "job-gradcam" and res[pair[0]].get("steady_images_per_s") and res[pair[1]].get("steady_images_per_s"):
                detail += f"; steady state {res[pair[1]]['steady_images_per_s'] / res[pair[0]]['steady_images_per_s']:.2f} x"
            if pair[0] == "cj-gradcam":
                model_cost = res[pair[0]]["model_s"] / res[pair[1]]["model_s"]
                detail += f"; model step alone {model_cost:.2f} x"
            verdict = "met" if cost <= 1.15 else f"missed by {cost - 1.15:.2f}"
            rows.append((f"camjobs gradcam <= 1.15 x camjobs cam ({what})", detail, verdict))
    for mine, what in (("cj-gradcam", "extractor loop"), ("job-gradcam", "job end to end")):
        if rate(mine) and rate("gradcam-lib"):
            speedup = rate(mine) / rate("gradcam-lib")
            detail = f"{speedup:.2f} x faster ({what})"
            if mine == "cj-gradcam":
                detail += f"; model step alone {res['gradcam-lib']['model_s'] / res[mine]['model_s']:.2f} x"
            verdict = "met" if speedup >= 3 else f"missed ({speedup:.2f} < 3)"
            rows.append((f"camjobs Grad-CAM >= 3 x faster than (d) ({what})", detail, verdict))
    if "paired" in res:
        r = res["paired"]
        total = {v: r["decode_s"] + r["model_s"][v] + r["localize_s"][v] for v in PAIRED}
        cost = total["cj-gradcam"] / total["cj-cam"]
        rows.append(("camjobs gradcam <= 1.15 x camjobs cam (paired loop)",
                     f"{cost:.2f} x; model step alone {r['model_s']['cj-gradcam'] / r['model_s']['cj-cam']:.2f} x",
                     "met" if cost <= 1.15 else f"missed by {cost - 1.15:.2f}"))
        speedup = total["gradcam-lib"] / total["cj-gradcam"]
        rows.append(("camjobs Grad-CAM >= 3 x faster than (d) (paired loop)",
                     f"{speedup:.2f} x faster; model step alone {r['model_s']['gradcam-lib'] / r['model_s']['cj-gradcam']:.2f} x",
                     "met" if speedup >= 3 else f"missed ({speedup:.2f} < 3)"))
    return rows


def render(rounds: list[dict[str, dict]], args, info: dict, loads: list[float], command: str, when: str | None = None) -> str:
    """The Markdown section: machine, then per round a table, the job details, the paired split and the targets.

    Rounds are shown separately, each against its own (a): on a shared machine the load changes a lot
    from one round to the next, and a ratio across rounds would mix two machines."""
    now = when or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## {now}: {args.model} at {args.input_size} px, {args.images} images ({args.width}x{args.height} JPEG)",
        "",
        f"- Command: `{command}`",
        f"- Machine: {info['cpu']}, {info['cores']} cores (os.cpu_count), {info['ram_gib']} GiB RAM, {info['platform']}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
        f"- Batch {args.batch_size} in the loops (the job's CPU default is 16), torch threads {args.threads or info['cores']} "
        "in the loops; untrained seeded weights (same FLOPs)",
        f"- 1-minute load average during the run (sampled every 5 s): min {min(loads):.2f}, mean {statistics.mean(loads):.2f}, "
        f"max {max(loads):.2f}" + (f"; {len(rounds)} rounds (the second in reverse order), each against its own (a)" if len(rounds) > 1 else ""),
    ]
    verdicts = []
    for index, res in enumerate(rounds):
        if len(rounds) > 1:
            loads_in = [r[k] for r in res.values() for k in ("load_start", "load_end") if k in r]
            lines += ["", f"### Round {index + 1} (load 1m at the variants' starts and ends: mean {statistics.mean(loads_in):.1f})"]
        round_lines, rows = _render_round(res, args)
        lines += round_lines
        verdicts.append(rows)
    if len(rounds) > 1:
        lines += ["", "### Targets, round by round", "", "| target | " + " | ".join(f"round {i + 1}" for i in range(len(rounds))) + " |",
                  "| --- |" + " --- |" * len(rounds)]
        names = list(dict.fromkeys(a for rows in verdicts for a, _, _ in rows))
        for name in names:
            cells = []
            for rows in verdicts:
                found = next(((b, c) for a, b, c in rows if a == name), None)
                cells.append(f"{found[1]}: {found[0].split(';')[0]}" if found else "-")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _render_round(res: dict[str, dict], args) -> tuple[list[str], list[tuple[str, str, str]]]:
    base = res.get("bare", {}).get("images_per_s")
    lines = [
        "",
        "| variant | images/s | x (a) | seconds | CPU s | peak RSS | load 1m start/end |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for variant in ALL_VARIANTS:
        if variant not in res or variant == "paired":
            continue
        r = res[variant]
        rss = r.get("peak_rss_kib") or r.get("tree_peak_rss_kib") or r.get("children_peak_rss_kib")
        if variant.startswith("job-") and "roles" in r:
            rss_text = f"driver {_mib(r['driver_peak_rss_kib'])}, actor {_mib(r['roles'].get('model actor', {}).get('peak_rss_kib'))}, all {_mib(r['tree_peak_rss_kib'])}"
            cpu = sum(role["cpu_s"] for role in r["roles"].values())
        else:
            rss_text, cpu = _mib(rss), r.get("cpu_s")
        ratio = f"{r['images_per_s'] / base:.2f}" if base else "-"
        load = f"{r['load_start']:.1f}/{r['load_end']:.1f}" if "load_start" in r else "-"
        lines.append(f"| {LABELS[variant]} | {r['images_per_s']:.2f} | {ratio} | {r['seconds'] if 'seconds' in r else r.get('cli_wall_s', 0):.1f} | "
                     f"{'-' if cpu is None else f'{cpu:.0f}'} | {rss_text} | {load} |")
    lines += ["", "Time split of the plain loops (seconds): decode = read+hash+decode+resize, model = forward / CAM, localize = upsample+heatmap+boxes", "",
              "| variant | decode | model | localize | set-up (untimed) |", "| --- | ---: | ---: | ---: | ---: |"]
    for variant in ("bare", "bare-unfolded", "cj-cam", "cj-gradcam", "torchcam", "gradcam-lib"):
        if variant in res:
            r = res[variant]
            lines.append(f"| {variant} | {r['decode_s']:.1f} | {r['model_s']:.1f} | {r['localize_s']:.1f} | {r['setup_s']:.1f} |")
    for variant in ("job-cam", "job-gradcam"):
        if variant not in res:
            continue
        r = res[variant]
        t = r["summary_timings"]
        lines += [
            "",
            f"`{variant}` ({r['processed']} processed, {r['errors']} errors; actor plan {r['actors']}):",
            "",
            f"- process wall {r['process_wall_s']:.1f} s = Python start + imports {r['process_to_import_s'] + r['imports_s']:.1f} s"
            f" + run_job {r['run_job_s']:.1f} s (list+load model {t['list_and_load_s']:.1f}, ray.init {t['ray_init_s']:.1f},"
            f" pipeline {t['pipeline_s']:.1f}, publish {r['run_job_s'] - t['total_s']:.1f}) + ray.shutdown {r['ray_shutdown_s']:.1f} s + exit",
            f"- end to end {r['images_per_s']:.2f} img/s; run summary's images_per_s {r['summary_throughput']['images_per_s']:.2f},"
            f" pipeline_images_per_s {r['summary_throughput']['pipeline_images_per_s']:.2f};"
            + (f" steady state (after the actor's first batch) {r['steady_images_per_s']:.2f} img/s"
               + (f" = {r['steady_images_per_s'] / base:.2f} x (a)" if base else "")
               if r.get("steady_images_per_s") else " steady state n/a (one batch)"),
            f"- model actor ready {r['actor_ready_after_s']} s after run_job started (its __init__ {r['actor_init_s']} s,"
            f" torch threads {r['actor_torch_threads']}); first batch done after {r['first_batch_after_s']:.1f} s",
            f"- actor busy {r['actor_busy_fraction']:.0%} of the time from its first to its last batch ({r['predict_batches']} batches):"
            + (f" extractor {r['actor_extractor_s']:.1f} s, localize {r['actor_localize_s']:.1f} s, PNG {r['actor_png_s']:.1f} s,"
               if "actor_localize_s" in r else  # before the localize stage left the actor
               f" extractor {r['actor_extractor_s']:.1f} s, localize stage (CPU tasks) {r['localize_busy_s']:.1f} s busy"
               f" in {r['localize_batches']} batches,")
            + f" rest (normalize, Arrow table) {r['actor_other_s']:.1f} s",
            f"- decode: {r['decode_batches']} batches in {r['decode_processes']} worker processes, {r['decode_busy_s']:.1f} s busy"
            f" over a span of {r['decode_span_s']:.1f} s",
            "- per process role (peak RSS summed over the role's processes at one sample, CPU seconds): "
            + "; ".join(f"{role} x{v['processes']}: {_mib(v['peak_rss_kib'])}, {v['cpu_s']:.0f} CPU s"
                        for role, v in sorted(r["roles"].items(), key=lambda kv: -kv[1]["cpu_s"])),
            "- busiest processes (CPU s): " + "; ".join(f"{p['name'].split('/')[-1]} {p['cpu_s']:.0f}" for p in r.get("top_processes", [])[:8]),
        ]
    if "paired" in res:
        r = res["paired"]
        n = r["images"]
        decode = r["decode_s"] / n * 1000
        total = {v: decode + (r["model_s"][v] + r["localize_s"][v]) / n * 1000 for v in PAIRED}
        lines += ["", f"Paired (same process, same batches, methods in rotating order per batch; {n} images, load"
                  f" {r['load_start']:.1f}/{r['load_end']:.1f}): ms per image; decode {decode:.1f} ms is shared and counted in each total", "",
                  "| method | model | localize | decode+model+localize | images/s | x (a) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for v in PAIRED:
            lines.append(f"| {LABELS[v]} | {r['model_s'][v] / n * 1000:.1f} | {r['localize_s'][v] / n * 1000:.1f} | {total[v]:.1f} |"
                         f" {1000 / total[v]:.2f} | {total['bare'] / total[v]:.2f} |")
    if "job-cli" in res:
        r = res["job-cli"]
        lines += ["", f"`job-cli`: the uninstrumented `camjobs run` took {r['cli_wall_s']:.1f} s ({r['images_per_s']:.2f} img/s end to end;"
                  f" summary pipeline_s {r['summary_timings']['pipeline_s']:.1f})"]
    rows = targets(res)
    if rows:
        lines += ["", "| target | measured | verdict |", "| --- | --- | --- |"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return lines, rows


def parent_main(args) -> None:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in ALL_VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(ALL_VARIANTS)}")
    data = dataset_dir(Path(args.data_dir), args.images, args.width, args.height)
    Path(args.scratch).mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="logs-", dir=args.scratch))
    info = machine_info()
    command = " ".join([".venv/bin/python", "benchmarks/bench.py"] + sys.argv[1:])
    print(f"bench: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB; load {os.getloadavg()}; logs in {log_dir}", flush=True)
    loads = LoadSampler()
    loads.start()
    rounds: list[dict[str, dict]] = []
    for round_index in range(args.rounds):
        results: dict[str, dict] = {}
        for variant in (variants if round_index % 2 == 0 else variants[::-1]):
            print(f"bench: round {round_index + 1}/{args.rounds} {variant} ...", flush=True)
            r = run_child(variant, args, data, log_dir)
            results[variant] = r
            extra = f", steady {r['steady_images_per_s']:.2f} img/s" if r.get("steady_images_per_s") else ""
            print(f"bench:   {r['images_per_s']:.2f} img/s ({r['images']} images in {r.get('seconds', r['process_wall_s']):.1f} s{extra}),"
                  f" load {os.getloadavg()[0]:.2f}", flush=True)
        rounds.append(results)
    load_values = loads.stop() or [os.getloadavg()[0]]
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": rounds, "machine": info, "loads": load_values, "command": command,
                                               "args": vars(args)}, indent=1, default=str))
    publish(render(rounds, args, info, load_values, command), args.results)


def publish(text: str, results: str | None) -> None:
    print()
    print(text)
    if results:
        path = Path(results)
        header = "" if path.exists() else "# camjobs CPU throughput\n\nWritten by `benchmarks/bench.py` and `benchmarks/scaling.py`; newest section last.\n\n"
        with open(path, "a") as f:
            f.write(header + text + "\n")
        print(f"bench: appended to {path}")


def render_saved(args) -> None:
    """--render-json FILE: the Markdown section again from a run's saved raw figures (and its options)."""
    saved = json.loads(Path(args.render_json).read_text())
    saved_args = argparse.Namespace(**{**vars(args), **saved.get("args", {})})
    when = dt.datetime.fromtimestamp(Path(args.render_json).stat().st_mtime, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = saved.get("command") or " ".join([".venv/bin/python", "benchmarks/bench.py"] + sys.argv[1:])
    publish(render(saved["rounds"], saved_args, saved["machine"], saved["loads"], command, when), args.results)


def add_common_args(p: argparse.ArgumentParser, images: int) -> None:
    """Options bench.py and scaling.py share: the model, the synthetic data, where results go."""
    p.add_argument("--images", type=int, default=images)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--classes", default="mel,nv,bkl")
    p.add_argument("--width", type=int, default=600)
    p.add_argument("--height", type=int, default=450)
    p.add_argument("--data-dir", default=os.environ.get("CAMJOBS_BENCH_DATA", "/tmp/camjobs-bench-data"), help="synthetic data cache")
    p.add_argument("--scratch", default=os.environ.get("CAMJOBS_BENCH_SCRATCH", "/tmp/camjobs-bench-out"), help="job outputs and logs")
    p.add_argument("--results", default=str(HERE / "results-cpu.md"), help="Markdown file to append to ('' for none)")
    p.add_argument("--json", default=None, help="also write every raw figure to this JSON file")
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, images=1024)
    p.add_argument("--batch-size", type=int, default=16, help="batch of the plain loops (the job's CPU default is 16)")
    p.add_argument("--job-batch-size", type=int, default=None, help="--batch-size for the job [default: the job's own]")
    p.add_argument("--actors", type=int, default=None, help="--actors for the job [default: the job's own]")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the plain loops [default: all cores]")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {', '.join(ALL_VARIANTS)}")
    p.add_argument("--paired-images", type=int, default=128, help="images of the 'paired' variant (it runs all five loop methods)")
    p.add_argument("--rounds", type=int, default=1, help="run every variant this many times (median shown)")
    p.add_argument("--render-json", default=None, help="only render the Markdown section of a run saved with --json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.worker:
        worker_main(arguments)
    elif arguments.render_json:
        render_saved(arguments)
    else:
        parent_main(arguments)
