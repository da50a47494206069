"""The nightly run: a simulated archive of N images, all but `--new` of them done, and `camjobs run
--incremental` over it: the bytes it reads, its wall time, the driver's peak RSS, the files in cams/.

    .venv/bin/python -m benchmarks.nightly --images 1000000 --new 1000
    .venv/bin/python -m benchmarks.nightly --images 300 --new 10 --listing 300 --nothing-new 300 --results /tmp/n.md

Steps (benchmarks/nightly_data.py makes the data, once, under --work):
1. The archive: N hard links to the distinct JPEGs of the ISIC 2017 sample (camjobs.synth's where it is
   absent) in the isic-archive layout (flat ISIC_<7 digits>.jpg, metadata.csv) or the folder layout.
2. Done rows for the first N - new images, seeded with camjobs' own writer (camjobs.output: staging,
   publish_run) with the settings of the run that follows (an untrained resnet18 at 64 px), the real
   content hash and file fingerprint of each image, placeholder maps: no model computes them.
3. The nightly run, the real command line in a fresh process and session: wall time (spawn to exit),
   the driver's peak RSS (its VmHWM), the archive's files that the run's processes open (the run under
   `strace -f -e trace=openat`, where strace exists; --no-trace: not) and their bytes, the bytes read by
   every process of the run (rchar and read_bytes of /proc/<pid>/io, sampled every 0.5 s and summed over
   the driver, Ray's processes and workers: rchar counts every read call, Python's imports and Ray's
   sockets included), and the run summary's counts; the files in cams/ before and after, then
   `camjobs compact` and the files and rows per file after it.
4. The driver's peak RSS listing the archive alone (camjobs.layouts.list_images in a fresh process) at
   each --listing size, and a run with nothing new at --nothing-new images (wall time, start-up included).

Every child is killed once its driver's RSS passes --rss-cap-gib (the machine is shared): a MISS.
The section goes to benchmarks/results-nightly.md (the round before it on this machine moves to history/).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import harness, nightly_data, results
from benchmarks.harness import HERE

GIB = 2**30


# --------------------------------------------------------------------------- a measured child process
def _io(pid: int) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/io").read_text()
    except OSError:  # gone meanwhile, or another user's
        return {}
    return {k: int(v) for k, v in (line.split(": ") for line in text.splitlines()) if k in ("rchar", "read_bytes")}


def _hwm(pid: int) -> int:
    """The process's peak RSS so far (VmHWM, kept by the kernel: no peak falls between two samples)."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        return int(next(line for line in lines if line.startswith("VmHWM:")).split()[1]) * 1024
    return 0


def _traced(command: list[str], trace: Path | None) -> list[str]:
    """The command under strace, which records every file its processes open (only openat stops them)."""
    if trace is None:
        return command
    return [
        "strace",
        "-f",
        "--seccomp-bpf",
        "-qq",
        "-e",
        "trace=openat",
        "-e",
        "status=successful",
        "-o",
        str(trace),
    ] + command


def measure(command: list[str], log_path: Path, rss_cap: float, timeout: float, trace: Path | None = None) -> dict:
    """`command` in a fresh session, sampled every 0.5 s until it exits: wall time, the driver's peak RSS
    (VmHWM), every process's read bytes (/proc/<pid>/io, the last sample of each process summed); with
    trace, under strace (the driver is then strace's child). Killed with its whole session past rss_cap
    bytes of driver RSS or timeout s."""
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    started = time.time()
    io: dict[int, dict[str, int]] = {}
    peak, driver, killed = 0, None, None
    with open(log_path, "w") as log:
        child = subprocess.Popen(
            _traced(command, trace),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=harness.ROOT,
            start_new_session=True,
        )
        while child.poll() is None:
            table = harness.process_table()
            if driver is None:
                below = sorted(pid for pid, stat in table.items() if stat[1] == child.pid)
                driver = child.pid if trace is None else (below[0] if below else None)
            for pid in harness.process_tree(child.pid, table):
                io[pid] = _io(pid) or io.get(pid, {})
            peak = max(peak, _hwm(driver) if driver else 0)
            if killed is None and (peak > rss_cap or time.time() - started > timeout):
                killed = f"driver RSS {peak / GIB:.2f} GiB > cap" if peak > rss_cap else f"timeout {timeout:.0f} s"
                harness.kill_session(child.pid)
            time.sleep(0.5)
    wall = time.time() - started
    harness.kill_session(child.pid)
    io.pop(child.pid if trace is not None else -1, None)  # strace's own reads are its trace's, not the run's
    return {
        "wall_s": round(wall, 1),
        "returncode": child.returncode,
        "killed": killed,
        "traced": trace is not None,
        "driver_peak_rss_mib": round(peak / 2**20, 1),
        "rchar": sum(v.get("rchar", 0) for v in io.values()),
        "read_bytes": sum(v.get("read_bytes", 0) for v in io.values()),
        "processes": len(io),
        "log": str(log_path),
    }


def opened_files(trace: Path, root: Path) -> dict:
    """The files below root that the run opened (its strace log): opens, distinct files, their bytes
    (each open counted with its file's size: camjobs reads an image whole)."""
    prefix = str(root) + "/"
    opens: list[str] = []
    with open(trace, errors="replace") as lines:
        for line in lines:
            start = line.find("openat(")
            if start >= 0 and prefix in line:
                path = line[line.index('"', start) + 1 :].split('"', 1)[0]
                if path.startswith(prefix) and os.path.isfile(path):  # not the folders the listing walks
                    opens.append(path)
    sizes = {path: os.path.getsize(path) for path in set(opens)}
    counts = collections.Counter(path[len(prefix) :] for path in opens)
    others = {name: n for name, n in counts.most_common() if n > 1 or not name.lower().endswith(".jpg")}
    return {"opens": len(opens), "files": len(sizes), "bytes": sum(sizes[p] for p in opens), "not_once": others}


def camjobs_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "camjobs", *args]


# --------------------------------------------------------------------------- the output's files
def cams_files(output: Path) -> dict:
    """Parquet files in OUTPUT/cams and their rows (live or not: what a bare reader sees)."""
    import pyarrow.parquet as pq

    rows = [pq.read_metadata(p).num_rows for p in sorted((output / "cams").rglob("*.parquet"))]
    return {"files": len(rows), "rows": sum(rows), "max_rows_per_file": max(rows, default=0)}


def live_rows(output: Path) -> int:
    from camjobs.output import open_cams

    return open_cams(str(output)).count_rows()


def newest_summary(output: Path, other_than: str) -> dict:
    """The summary of the run just measured: the newest one that is neither the seeded run nor a compaction."""
    from camjobs.output import read_run_summaries

    summaries, _ = read_run_summaries(str(output))
    runs = sorted(r for r, s in summaries.items() if r != other_than and not s.get("kind"))
    return summaries[runs[-1]] if runs else {}


# --------------------------------------------------------------------------- steps
def settings(model: dict) -> dict:
    """What the nightly run's rows carry (camjobs.pipeline.job's settings) with its default flags."""
    from camjobs.config import DEFAULT_THRESHOLD

    return {
        "model_sha256": model["model_sha256"],
        "method": "cam",
        "threshold": DEFAULT_THRESHOLD,
        "target_mode": "predicted",
        "input_size": model["input_size"],
        "refine": None,
    }


def seeded_output(args, images: int, done: int, srcs: list[dict], model: dict) -> tuple[Path, Path, dict]:
    """The archive of `images`, and a fresh output with rows for the first `done` of them."""
    root = nightly_data.archive(args.work, args.layout, images, srcs)
    output = args.work / f"out-{args.layout}-{images}-{images - done}"
    shutil.rmtree(output, ignore_errors=True)
    seeded = nightly_data.seed(output, root, args.layout, done, srcs, model, settings(model))
    return root, output, seeded


def run_incremental(args, root: Path, output: Path, checkpoint: Path, name: str, trace: bool = False) -> dict:
    """`camjobs run --incremental` measured; with trace (and strace installed), the archive's files it opened."""
    command = camjobs_command(
        "run", "--data", str(root), "--output", str(output), "--layout", args.layout, "--checkpoint", str(checkpoint)
    )
    opens = args.work / f"{name}.strace" if trace and shutil.which("strace") else None
    run = measure([*command, "--incremental"], args.work / f"{name}.log", args.rss_cap_gib * GIB, args.timeout, opens)
    if opens is not None:
        run["opened"] = opened_files(opens, root)
        opens.unlink()
    return run


def nightly(args, srcs: list[dict], checkpoint: Path, model: dict) -> dict:
    """Step 3: the nightly run over `--images` with `--new` new ones, then compact."""
    root, output, seeded = seeded_output(args, args.images, args.images - args.new, srcs, model)
    before = cams_files(output)
    print(f"nightly run over {args.images} images, {args.new} new ...", file=sys.stderr, flush=True)
    run = run_incremental(args, root, output, checkpoint, "nightly", trace=args.trace)
    summary = newest_summary(output, seeded["run_id"])
    out = {
        "images": args.images,
        "new": args.new,
        "archive_bytes": nightly_data.archive_bytes(args.images, srcs),
        "new_bytes": nightly_data.archive_bytes(args.images, srcs, first=args.images - args.new),
        "run": run,
        "run_id": summary.get("run_id"),
        "counts": summary.get("counts", {}),
        "timings": summary.get("timings", {}),
        "cams_before": before,
        "cams_after": cams_files(output),
    }
    if run["returncode"] == 0:
        out["live_rows_after"] = live_rows(output)
    if args.compact and run["returncode"] == 0:
        print("camjobs compact ...", file=sys.stderr, flush=True)
        compact = measure(
            camjobs_command("compact", "--output", str(output)),
            args.work / "compact.log",
            args.rss_cap_gib * GIB,
            args.timeout,
        )
        out["compact"] = compact
        out["cams_compacted"] = cams_files(output)
        if compact["returncode"] == 0:
            out["live_rows_compacted"] = live_rows(output)
        else:
            out["compact_error"] = Path(compact["log"]).read_text(errors="replace")[-600:]
    elif run["returncode"] != 0:
        out["error"] = Path(run["log"]).read_text(errors="replace")[-2000:]
    return out


def listing(args, srcs: list[dict], images: int) -> dict:
    """Step 4: the driver's peak RSS of the listing alone, in a fresh process."""
    root = nightly_data.archive(args.work, args.layout, images, srcs)
    print(f"listing {images} images ...", file=sys.stderr, flush=True)
    command = [sys.executable, "-m", "benchmarks.nightly", "--child-list", str(root), "--layout", args.layout]
    got = measure(command, args.work / f"listing-{images}.log", args.rss_cap_gib * GIB, args.timeout)
    text = Path(got["log"]).read_text(errors="replace")
    line = next((x for x in reversed(text.splitlines()) if x.startswith(harness.RESULT_PREFIX)), None)
    return {"images": images, **got, **(json.loads(line.removeprefix(harness.RESULT_PREFIX)) if line else {})}


def nothing_new(args, srcs: list[dict], checkpoint: Path, model: dict) -> dict:
    """Step 4: a run over `--nothing-new` images that are all done: wall time, start-up included."""
    images = args.nothing_new
    root, output, _ = seeded_output(args, images, images, srcs, model)
    print(f"nothing-new run over {images} images ...", file=sys.stderr, flush=True)
    run = run_incremental(args, root, output, checkpoint, "nothing-new")
    summary = newest_summary(output, _["run_id"])
    return {"images": images, "run": run, "counts": summary.get("counts", {}), "timings": summary.get("timings", {})}


def child_list(root: str, layout: str) -> None:
    """In the fresh process of `listing`: list, count, say the peak RSS (VmHWM: getrusage's would count
    the forking parent's too)."""
    from camjobs.layouts import list_images

    started = time.time()
    found = list_images(root, layout)
    count = found.table.num_rows if hasattr(found, "table") else len(found.records)  # no object per image
    harness.emit(
        {"listed": count, "list_s": round(time.time() - started, 2), "hwm_mib": round(_hwm(os.getpid()) / 2**20, 1)}
    )


# --------------------------------------------------------------------------- the report
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.nightly", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1_000_000, help="images in the archive (default 1,000,000)")
    parser.add_argument("--new", type=int, default=1000, help="of them, the images without a done row (1,000)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/camjobs-nightly"), help="archives, outputs, logs")
    parser.add_argument("--layout", choices=("isic-archive", "folder"), default="isic-archive")
    parser.add_argument("--sources", type=int, default=200, help="distinct JPEGs linked (at most the sample's)")
    parser.add_argument("--listing", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--nothing-new", type=int, default=10_000, help="images of the nothing-new run (0: none)")
    parser.add_argument("--no-trace", dest="trace", action="store_false", help="the nightly run without strace")
    parser.add_argument("--no-compact", dest="compact", action="store_false", help="skip camjobs compact")
    parser.add_argument("--rss-cap-gib", type=float, default=6.0, help="kill a child whose driver passes this")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per child process")
    parser.add_argument("--results", default=str(HERE / "results-nightly.md"), help="Markdown file ('' for none)")
    parser.add_argument("--json", type=Path, help="every raw figure, as JSON")
    parser.add_argument("--note", default="", help="a line for the results section (what else ran meanwhile)")
    parser.add_argument("--child-list", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_list:
        return child_list(args.child_list, args.layout)
    if not 0 <= args.new <= args.images:
        parser.error("--new must be between 0 and --images")
    args.work.mkdir(parents=True, exist_ok=True)
    load = harness.LoadSampler()
    load.start()
    srcs = nightly_data.sources(args.work, args.sources)
    checkpoint, model = nightly_data.checkpoint(args.work, srcs)
    figures = {"command": " ".join(["python -m benchmarks.nightly", *(argv or sys.argv[1:])]), "sources": srcs}
    figures["nightly"] = nightly(args, srcs, checkpoint, model)
    figures["listing"] = [listing(args, srcs, n) for n in args.listing]
    figures["nothing_new"] = nothing_new(args, srcs, checkpoint, model) if args.nothing_new else None
    figures["load"] = load.stop()
    figures["machine"] = {**harness.machine_facts(), "disk": disk(args.work)}
    figures["note"] = args.note
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1, default=str))
    from benchmarks.nightly_report import render

    section = render(figures)
    print(section)
    marker = results.round_marker("nightly.py", figures["machine"], f"{args.images} images")
    results.publish(args.results, section, marker, "camjobs nightly run: a million images, a thousand new")


def disk(path: Path) -> str:
    """The file system under path: device, type, size, free, rotational or not."""
    usage = shutil.disk_usage(path)
    device, kind = "?", "?"
    with contextlib.suppress(OSError):
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
        best = max((m for m in mounts if str(path.resolve()).startswith(m[1])), key=lambda m: len(m[1]))
        device, kind = best[0], best[2]
    rotational = Path(f"/sys/block/{Path(device).name}/queue/rotational")
    spinning = rotational.read_text().strip() == "1" if rotational.is_file() else None
    return (
        f"{device} ({kind}, {usage.total / GIB:.0f} GiB, {usage.free / GIB:.0f} GiB free"
        + ("" if spinning is None else ", rotational" if spinning else ", not rotational")
        + ")"
    )


if __name__ == "__main__":
    main()
