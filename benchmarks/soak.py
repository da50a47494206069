"""Soak test: push many small synthetic images through `camjobs run` and watch memory and rate.

    .venv/bin/python benchmarks/soak.py --sizes 5000 20000

For each size it runs the whole job (a fresh local Ray cluster each time) and samples, every
second, the driver's RSS, each model actor's RSS and the rows staged so far. Streaming
execution means the peaks must not grow with the number of images, and the rate must stay
steady from the first quarter of the run to the last. Results are appended to
benchmarks/results-soak.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
from PIL import Image

RESULTS = Path(__file__).with_name("results-soak.md")


def make_images(folder: Path, count: int) -> None:
    """Small noisy JPEGs, written once and reused: decoding is not what this test is about."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = len(list(folder.glob("*.jpg")))
    rng = np.random.default_rng(existing)
    for i in range(existing, count):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / f"img{i:06d}.jpg", quality=85)


def staged_rows(output: Path) -> int:
    rows = 0
    for path in list((output / "_staging").rglob("*.parquet")) + list((output / "cams").rglob("*.parquet")):
        try:
            rows += pq.read_metadata(path).num_rows
        except Exception:  # a file being written: counted at the next sample
            pass
    return rows


def soak(data: Path, output: Path, count: int) -> dict:
    command = [sys.executable, "-m", "camjobs", "run", "--data", str(data), "--output", str(output), "--layout", "folder",
               "--model", "resnet18", "--classes", "a,b", "--input-size", "64", "--batch-size", "64"]
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    started = time.time()
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    samples: list[tuple[float, int, int, int]] = []  # time, driver rss, max actor rss, rows
    done = threading.Event()

    def sample() -> None:
        process = psutil.Process(driver.pid)
        while not done.is_set():
            try:
                driver_rss = process.memory_info().rss
            except psutil.Error:
                break
            actor_rss = 0
            for candidate in psutil.process_iter(["cmdline", "memory_info"]):
                cmdline = " ".join(candidate.info["cmdline"] or [])
                if "CamPredictor" in cmdline and candidate.info["memory_info"]:
                    actor_rss = max(actor_rss, candidate.info["memory_info"].rss)
            samples.append((time.time() - started, driver_rss, actor_rss, staged_rows(output)))
            done.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    log, _ = driver.communicate()
    done.set()
    sampler.join()
    wall = time.time() - started
    if driver.returncode != 0:
        raise RuntimeError(f"camjobs run exited {driver.returncode}:\n{log[-3000:]}")
    busy = [s for s in samples if 0 < s[3] < count]
    quarter = max(1, len(busy) // 4)

    def rate(window):
        return (window[-1][3] - window[0][3]) / max(window[-1][0] - window[0][0], 1e-9) if len(window) > 1 else float("nan")

    return {
        "images": count,
        "wall_s": round(wall, 1),
        "images_per_s": round(count / wall, 1),
        "rate_first_quarter": round(rate(busy[:quarter + 1]), 1),
        "rate_last_quarter": round(rate(busy[-quarter - 1:]), 1),
        "driver_peak_rss_mib": round(max(s[1] for s in samples) / 2**20),
        "actor_peak_rss_mib": round(max(s[2] for s in samples) / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/camjobs-soak"))
    args = parser.parse_args()
    data = args.work / "data"
    make_images(data, max(args.sizes))
    rows = []
    for size in args.sizes:
        subset = args.work / f"data-{size}"
        if not subset.exists():
            subset.mkdir(parents=True)
            for path in sorted(data.glob("*.jpg"))[:size]:
                os.link(path, subset / path.name)  # hard links: a symlink out of the root is refused
        output = args.work / f"out-{size}-{int(time.time())}"
        result = soak(subset, output, size)
        print(json.dumps(result), flush=True)
        rows.append(result)
    lines = [
        f"\n## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}",
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), {psutil.virtual_memory().total / 2**30:.0f} GiB; "
        f"resnet18 at 64 px, 64x48 JPEGs, batch 64, one CPU actor; load average at the end {os.getloadavg()[0]:.1f}",
        "",
        "| images | wall s | images/s | rate, first quarter | rate, last quarter | driver peak RSS MiB | actor peak RSS MiB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['images']} | {r['wall_s']} | {r['images_per_s']} | {r['rate_first_quarter']} | "
                     f"{r['rate_last_quarter']} | {r['driver_peak_rss_mib']} | {r['actor_peak_rss_mib']} |")
    with RESULTS.open("a") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
