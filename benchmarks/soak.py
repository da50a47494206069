"""Soak test: push many small synthetic images through `camjobs run` and watch memory and rate.

    .venv/bin/python -m benchmarks.soak --sizes 5000 20000

For each size it runs the whole job (the real command line, a fresh local Ray cluster each time)
and samples, every second, the RSS of the driver and of every process below it
(harness.ProcessSampler) and the rows staged so far. Streaming execution means the peaks must
not grow with the number of images, and the rate must stay steady from the first quarter of the
run to the last. The section goes to benchmarks/results-soak.md (the round before it on this
machine moves to history/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import datasets, harness, results
from benchmarks.harness import HERE


def staged_rows(output: Path) -> int:
    import pyarrow.parquet as pq

    rows = 0
    for path in list((output / "_staging").rglob("*.parquet")) + list((output / "cams").rglob("*.parquet")):
        with contextlib.suppress(Exception):  # a file being written: counted at the next sample
            rows += pq.read_metadata(path).num_rows
    return rows


def soak(data: Path, output: Path, count: int) -> dict:
    command = [
        sys.executable,
        "-m",
        "camjobs",
        "run",
        "--data",
        str(data),
        "--output",
        str(output),
        "--layout",
        "folder",
        "--model",
        "resnet18",
        "--classes",
        "a,b",
        "--input-size",
        "64",
        "--batch-size",
        "64",
    ]
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    log_path = output.with_suffix(".log")
    started = time.time()
    with open(log_path, "w") as log:
        driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        sampler = harness.ProcessSampler(root=driver.pid)
        rows: list[tuple[float, int]] = []  # (seconds since start, rows staged)
        while driver.poll() is None:
            sampler.sample()
            rows.append((time.time() - started, staged_rows(output)))
            time.sleep(1.0)
    wall = time.time() - started
    if driver.returncode != 0:
        raise RuntimeError(f"camjobs run exited {driver.returncode}:\n{log_path.read_text()[-3000:]}")
    busy = [r for r in rows if 0 < r[1] < count]
    quarter = max(1, len(busy) // 4)

    def rate(window):
        return (window[-1][1] - window[0][1]) / max(window[-1][0] - window[0][0], 1e-9) if len(window) > 1 else None

    actors = [p["peak_rss"] for p in sampler.procs.values() if any("CamPredictor" in n for n in p["names"])]
    return {
        "images": count,
        "wall_s": round(wall, 1),
        "images_per_s": round(count / wall, 1),
        "rate_first_quarter": harness.rounded(rate(busy[: quarter + 1]), 1),
        "rate_last_quarter": harness.rounded(rate(busy[-quarter - 1 :]), 1),
        "driver_peak_rss_mib": round(sampler.procs.get(driver.pid, {"peak_rss": 0})["peak_rss"] / 2**20),
        "actor_peak_rss_mib": round(max(actors, default=0) / 2**20),
    }


def render(facts: dict, rows: list[dict]) -> str:
    lines = [
        f"## {harness.utc_now()}: soak, resnet18 at 64 px, 64x48 JPEGs, batch 64, one CPU actor",
        "",
        f"- Command: `{' '.join(['.venv/bin/python -m benchmarks.soak'] + sys.argv[1:])}`",
        *harness.machine_lines(facts),
        f"- 1-minute load average at the end: {os.getloadavg()[0]:.1f}",
        "",
        "| images | wall s | images/s | rate, first quarter | rate, last quarter | driver peak RSS MiB | "
        "actor peak RSS MiB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['images']} | {r['wall_s']} | {r['images_per_s']} | {r['rate_first_quarter']} | "
        f"{r['rate_last_quarter']} | {r['driver_peak_rss_mib']} | {r['actor_peak_rss_mib']} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/camjobs-soak"))
    parser.add_argument("--results", default=str(HERE / "results-soak.md"), help="Markdown results file ('' for none)")
    args = parser.parse_args(argv)
    data = datasets.tiny_jpegs(args.work / "data", max(args.sizes), layout="folder")
    rows = []
    for size in args.sizes:
        subset = args.work / f"data-{size}"
        if not subset.exists():
            subset.mkdir(parents=True)
            for path in sorted(data.glob("*.jpg"))[:size]:
                os.link(path, subset / path.name)  # hard links: a symlink out of the root is refused
        result = soak(subset, args.work / f"out-{size}-{int(time.time())}", size)
        print(json.dumps(result), flush=True)
        rows.append(result)
    facts = harness.machine_facts()
    results.publish(args.results, render(facts, rows), results.round_marker("soak.py", facts), "camjobs soak test")


if __name__ == "__main__":
    main()
