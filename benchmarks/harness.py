"""What every benchmark shares: timed stages, the steady rate, a process sampler, machine facts,
and child processes (pipeline variants: variants.py; results files: results.py; data: datasets.py).

The scripts run from the repository root as modules (`python -m benchmarks.bench ...`), so that
Ray's workers, which get the driver's sys.path, import this module as the driver does. Only the
standard library is imported here at module level: the Ray workers that run a timed stage import
this module too.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULT_PREFIX = "BENCH-RESULT "


# --------------------------------------------------------------------------- timed stages


def timed(kind: str, fn, log_path: str):
    """A Stage's fn that appends one JSON line per batch ({kind, pid, start, end, n}) to log_path.

    A function stage's fn is wrapped; a class stage's (the model actor) is subclassed, and also logs
    its construction ("actor_init") and the time each batch spent in its `extractor`, if it has one.
    The wrappers are closures, shipped to the Ray workers by value; the workers import this module
    for the helpers they call."""
    return _timed_class(kind, fn, log_path) if isinstance(fn, type) else _timed_function(kind, fn, log_path)


def _rows(batch) -> int:
    return batch.num_rows if hasattr(batch, "num_rows") else len(next(iter(batch.values())))


def _append(log_path: str, record: dict) -> None:
    record["pid"] = os.getpid()
    with open(log_path, "a") as log:
        log.write(json.dumps(record) + "\n")


def _timed_function(kind: str, fn, log_path: str):
    def run(batch, **kwargs):
        start = time.time()
        out = fn(batch, **kwargs)
        _append(log_path, {"kind": kind, "start": start, "end": time.time(), "n": _rows(batch)})
        return out

    run.__name__ = f"timed_{getattr(fn, '__name__', kind)}"
    return run


def _timed_class(kind: str, cls: type, log_path: str) -> type:
    def __init__(self, *args, **kwargs):
        start = time.time()
        cls.__init__(self, *args, **kwargs)
        torch = sys.modules.get("torch")
        _append(
            log_path,
            {
                "kind": "actor_init",
                "start": start,
                "end": time.time(),
                "torch_threads": torch.get_num_threads() if torch else None,
            },
        )
        self._timed_extractor_s = [0.0]
        if hasattr(self, "extractor"):
            inner, spent = self.extractor, self._timed_extractor_s

            def extractor(*a, **k):
                t = time.perf_counter()
                try:
                    return inner(*a, **k)
                finally:
                    spent[0] += time.perf_counter() - t

            self.extractor = extractor

    def __call__(self, batch):
        start, before = time.time(), self._timed_extractor_s[0]
        out = cls.__call__(self, batch)
        _append(
            log_path,
            {
                "kind": kind,
                "start": start,
                "end": time.time(),
                "n": _rows(batch),
                "extractor_s": self._timed_extractor_s[0] - before,
            },
        )
        return out

    return type(f"Timed{cls.__name__}", (cls,), {"__init__": __init__, "__call__": __call__})


def read_log(log_path) -> list[dict]:
    """The records a timed run wrote, or none where no batch was logged."""
    path = Path(log_path)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def batch_ends(records: Iterable[dict], kind: str = "localize") -> list[tuple[float, int]]:
    """(end, rows) of each batch of one stage, in the order they finished."""
    return sorted((r["end"], r["n"]) for r in records if r["kind"] == kind)


def busy_s(records: Iterable[dict], kind: str) -> float:
    return sum(r["end"] - r["start"] for r in records if r["kind"] == kind)


# --------------------------------------------------------------------------- rates


def steady_rate(batches: Sequence[tuple[float, int]]) -> float | None:
    """The steady rate (images/s), the only one the scripts report under that name: the rows of the
    last stage's batches (end, rows) that end between the end of the first quarter of them and the
    end of the last quarter, over that time; start-up and drain are left out (nothing is, under
    four batches). None under two batches."""
    window = steady_window(batches)
    if window is None:
        return None
    return sum(n for end, n in batches if window[0] < end <= window[1]) / (window[1] - window[0])


def steady_window(batches: Sequence[tuple[float, int]]) -> tuple[float, float] | None:
    """(start, end) of the steady rate's window: the ends of the first and last quarters of the batches."""
    ends = sorted(end for end, _ in batches)
    quarter = len(ends) // 4
    middle = ends[quarter : len(ends) - quarter]
    return (middle[0], middle[-1]) if len(middle) > 1 and middle[-1] > middle[0] else None


def rate_after_first(batches: Sequence[tuple[float, int]]) -> float | None:
    """Images/s from the end of the first batch to the end of the last (start-up out, drain in)."""
    ends = sorted(batches)
    if len(ends) < 2 or ends[-1][0] <= ends[0][0]:
        return None
    return sum(n for _, n in ends[1:]) / (ends[-1][0] - ends[0][0])


def stage_figures(records: Sequence[dict], started: float) -> dict:
    """What a timed run's log says (times in s from `started`, rates in images/s): the steady rate and
    the rate after the first batch of the last stage, the model actors' start-up and busy share,
    and per stage its batches, busy seconds, processes and tasks running at once in the steady window."""
    last = batch_ends(records, "localize")
    predicts = [r for r in records if r["kind"] == "predict"]
    inits = [r for r in records if r["kind"] == "actor_init"]
    window = steady_window(last)
    out = {
        "steady_images_per_s": rounded(steady_rate(last)),
        "after_first_images_per_s": rounded(rate_after_first(last)),
        "first_batch_after_s": rounded(last[0][0] - started) if last else None,
        "actor_init_s": [round(r["end"] - r["start"], 3) for r in inits],
        "actor_ready_after_s": [round(r["end"] - started, 3) for r in inits],
        "actor_torch_threads": [r["torch_threads"] for r in inits],
        "actor_extractor_s": round(sum(r.get("extractor_s", 0.0) for r in predicts), 3),
    }
    if predicts:
        span = max(r["end"] for r in predicts) - min(r["start"] for r in predicts)
        busy = busy_s(predicts, "predict")
        out["actor_busy_fraction"] = round(busy / (max(1, len(inits)) * span), 3) if span else None
    for kind in ("decode", "predict", "localize"):
        mine = [r for r in records if r["kind"] == kind]
        out[kind] = {
            "batches": len(mine),
            "rows": sum(r["n"] for r in mine),
            "busy_s": round(busy_s(mine, kind), 3),
            "processes": len({r["pid"] for r in mine}),
            "span_s": round(max(r["end"] for r in mine) - min(r["start"] for r in mine), 3) if mine else 0.0,
        }
        if window:  # time busy inside the window / its length
            out[kind]["at_once"] = round(
                sum(max(0.0, min(r["end"], window[1]) - max(r["start"], window[0])) for r in mine)
                / (window[1] - window[0]),
                2,
            )
    return out


def rounded(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


# --------------------------------------------------------------------------- processes


def _stat(pid: int) -> tuple | None:
    """(state, ppid, session, CPU seconds, RSS bytes) of a process from /proc, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (
        fields[0],
        int(fields[1]),
        int(fields[3]),
        (int(fields[11]) + int(fields[12])) / ticks,
        int(fields[21]) * os.sysconf("SC_PAGE_SIZE"),
    )


def _name(pid: int) -> str:
    """A process's title (Ray workers set theirs: "ray::MapWorker(...)"), 120 characters at most."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0")[:2]).strip()[:120]


def process_table() -> dict[int, tuple]:
    """pid -> _stat of every live (not zombie) process."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := _stat(int(name))) and stat[0] != "Z":
            table[int(name)] = stat
    return table


def process_tree(root: int, table: Mapping[int, tuple]) -> set[int]:
    """root, everything below it, and, where root leads a session, the rest of that session
    (a Ray process whose parent died is re-parented, but keeps its session)."""
    children: dict[int, list[int]] = {}
    for pid, stat in table.items():
        children.setdefault(stat[1], []).append(pid)
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree.add(pid)
            todo += children.get(pid, [])
    if root in table and table[root][2] == root:
        tree |= {pid for pid, stat in table.items() if stat[2] == root}
    return tree & set(table)


def kill_session(sid: int) -> int:
    """SIGKILL what is left of a child's session (the child and the Ray processes it started), again
    until none is left: a dying raylet can still be starting a process."""
    killed: set[int] = set()
    for _ in range(20):
        pids = [pid for pid, stat in process_table().items() if stat[2] == sid and pid != os.getpid()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(OSError):  # gone meanwhile
                os.kill(pid, signal.SIGKILL)
        killed.update(pids)
        time.sleep(0.25)
    return len(killed)


class ProcessSampler(threading.Thread):
    """RSS and CPU seconds of a process and everything below it (Ray's GCS, raylet and workers),
    from /proc every `interval` s; with gpu=True, nvidia-smi's utilization and memory too."""

    def __init__(self, root: int | None = None, interval: float = 1.0, gpu: bool = False):
        super().__init__(daemon=True)
        self.root, self.interval = root or os.getpid(), interval
        self.procs: dict[int, dict] = {}  # pid -> {"names": set, "peak_rss": bytes, "cpu_s": float}
        self.samples: list[tuple[float, dict[int, int]]] = []  # (time, pid -> RSS bytes)
        self.gpu: list[tuple[float, float]] | None = [] if gpu and shutil.which("nvidia-smi") else None
        self._stop_event = threading.Event()

    def sample(self) -> dict[int, int]:
        table = process_table()
        rss = {}
        for pid in process_tree(self.root, table):
            info = self.procs.setdefault(pid, {"names": set(), "peak_rss": 0, "cpu_s": 0.0})
            info["names"].add("driver" if pid == os.getpid() else _name(pid))
            info["peak_rss"] = max(info["peak_rss"], table[pid][4])
            info["cpu_s"] = max(info["cpu_s"], table[pid][3])
            rss[pid] = table[pid][4]
        self.samples.append((time.time(), rss))
        if self.gpu is not None:
            line = (nvidia_smi("utilization.gpu,memory.used", units=False) or ["nan, nan"])[0]
            with contextlib.suppress(ValueError):  # "[N/A]" on some boards
                self.gpu.append(tuple(float(v) for v in line.split(",")[:2]))
        return rss

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> ProcessSampler:
        self._stop_event.set()
        if self.is_alive():
            self.join()
        self.sample()
        return self

    def tree_peak_rss_mib(self) -> float:
        """The largest RSS summed over the tree at one sample (shared pages counted in each process)."""
        return round(max((sum(s.values()) for _, s in self.samples), default=0) / 2**20, 1)

    def summary(self) -> dict:
        procs = self.procs.values()
        out = {
            "tree_peak_rss_mib": self.tree_peak_rss_mib(),
            "tree_cpu_s": round(sum(p["cpu_s"] for p in procs), 1),
            "largest_process_peak_rss_mib": round(max((p["peak_rss"] for p in procs), default=0) / 2**20, 1),
        }
        gpu = [s for s in self.gpu or [] if s[0] == s[0]]  # NaN: a failed query
        if gpu:
            out.update(
                gpu_util_mean=round(sum(s[0] for s in gpu) / len(gpu), 1),
                gpu_util_max=max(s[0] for s in gpu),
                gpu_memory_used_peak_mib=max(s[1] for s in gpu),
                gpu_samples=len(gpu),
            )
        return out

    def roles(self, role_of: Callable[[int, set[str]], str]) -> dict[str, dict]:
        """Per role (role_of(pid, names)): processes, peak RSS summed over them at one sample, CPU seconds."""
        of = {pid: role_of(pid, info["names"]) for pid, info in self.procs.items()}
        roles = {role: {"processes": 0, "peak_rss_mib": 0.0, "cpu_s": 0.0} for role in of.values()}
        for pid, info in self.procs.items():
            roles[of[pid]]["processes"] += 1
            roles[of[pid]]["cpu_s"] = round(roles[of[pid]]["cpu_s"] + info["cpu_s"], 1)
        for _, sample in self.samples:
            per_role: dict[str, int] = {}
            for pid, rss in sample.items():
                per_role[of[pid]] = per_role.get(of[pid], 0) + rss
            for role, rss in per_role.items():
                roles[role]["peak_rss_mib"] = max(roles[role]["peak_rss_mib"], round(rss / 2**20, 1))
        return roles


def peak_rss_mib(who: str = "self") -> float:
    """This process's (or its waited-for children's) peak RSS so far, from getrusage."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF if who == "self" else resource.RUSAGE_CHILDREN)
    return round(usage.ru_maxrss / 1024, 1)  # KiB on Linux


class LoadSampler(threading.Thread):
    """The 1-minute load average every `interval` s: how busy the shared machine was meanwhile."""

    def __init__(self, interval: float = 5.0):
        super().__init__(daemon=True)
        self.interval, self.values, self._stop_event = interval, [], threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.values.append(os.getloadavg()[0])
            self._stop_event.wait(self.interval)

    def stop(self) -> list[float]:
        self._stop_event.set()
        self.join()
        return self.values or [os.getloadavg()[0]]


# --------------------------------------------------------------------------- machine facts

VERSIONS = (
    "camjobs",
    "torch",
    "torchvision",
    "ray",
    "pyarrow",
    "numpy",
    "opencv-python-headless",
    "pillow",
    "torchcam",
    "grad-cam",
)


def nvidia_smi(query: str, units: bool = True) -> list[str] | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        form = "csv,noheader" + ("" if units else ",nounits")
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", f"--format={form}"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in done.stdout.splitlines() if line.strip()] or None


def _proc_line(path: str, prefix: str) -> str | None:
    try:
        return next(
            (line.split(":", 1)[1].strip() for line in Path(path).read_text().splitlines() if line.startswith(prefix)),
            None,
        )
    except OSError:
        return None


def machine_facts(torch_gpu: bool = False) -> dict:
    """CPU model, cores, memory, /dev/shm, GPUs (nvidia-smi; with torch_gpu, torch's view too) and
    the installed versions of the libraries that matter, without importing them."""
    mem = _proc_line("/proc/meminfo", "MemTotal")
    facts = {
        "cpu": _proc_line("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "ram_gib": round(int(mem.split()[0]) / 2**20, 1) if mem else None,
        "dev_shm_gib": round(shutil.disk_usage("/dev/shm").total / 2**30, 1) if Path("/dev/shm").is_dir() else None,
        "platform": platform.platform(),
        "host": platform.node(),
        "date_utc": utc_now(),
        "nvidia_smi": nvidia_smi("name,driver_version,memory.total"),
        "raylets_running": sum(1 for pid in process_table() if "raylet" in _name(pid)),
        "versions": {"python": platform.python_version()},
    }
    for dist in VERSIONS:
        with contextlib.suppress(metadata.PackageNotFoundError):  # only the installed ones
            facts["versions"][dist.removesuffix("-python-headless")] = metadata.version(dist)
    if torch_gpu:
        import torch

        facts["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            facts.update(
                gpu=props.name,
                gpu_memory_gib=round(props.total_memory / 2**30, 1),
                gpu_count=torch.cuda.device_count(),
                cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version(),
            )
    return facts


def machine_key(facts: Mapping) -> str:
    """What makes two rounds the same machine: the CPU, its cores, and the GPU if any."""
    gpu = facts.get("gpu") or next(iter(facts.get("nvidia_smi") or []), "").split(",")[0]
    return f"{facts['cpu']}, {facts['cores']} cores" + (f", {gpu}" if gpu else "")


def machine_lines(facts: Mapping) -> list[str]:
    """The Markdown lines that name the machine and the versions."""
    return [
        f"- Machine: {facts['cpu']}, {facts['cores']} cores ({facts.get('usable_cores', '?')} usable), "
        f"{facts['ram_gib']} GiB RAM, {facts['platform']}"
        + (f"; nvidia-smi: {'; '.join(facts['nvidia_smi'])}" if facts.get("nvidia_smi") else ""),
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in facts["versions"].items()),
    ]


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# --------------------------------------------------------------------------- child processes


def emit(result: Mapping) -> None:
    """The child's answer to run_child: one line on stdout."""
    print(RESULT_PREFIX + json.dumps(result, default=lambda o: sorted(o) if isinstance(o, set) else str(o)), flush=True)


def run_child(module: str, argv: Sequence[str], log_path, timeout: float | None = None, check: bool = True) -> dict:
    """`python -m benchmarks.<module> <argv>` in a fresh process and session (its own Ray cluster,
    its own peak RSS), from the repository root, stderr to log_path; its emit()ted result, with
    process_wall_s (spawn to exit) and status. On timeout the whole session is killed. With check,
    a failure raises; else it comes back as status and error (the log's tail)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started, killed = time.time(), False
    with open(log_path, "w") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", f"benchmarks.{module}", *argv],
            env=env,
            cwd=str(ROOT),
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, _ = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_session(child.pid)
            stdout, _ = child.communicate()
            killed = True
    out = {
        "process_wall_s": round(time.time() - started, 3),
        "returncode": child.returncode,
        "log": str(log_path),
        "leftover_processes_killed": kill_session(child.pid),
    }
    line = next((x for x in reversed(stdout.splitlines()) if x.startswith(RESULT_PREFIX)), None)
    if killed or child.returncode != 0 or line is None:
        out["status"] = f"killed after {timeout:.0f} s" if killed else f"failed (exit {child.returncode})"
        out["error"] = log_path.read_text(errors="replace")[-4000:]
        if check:
            what = f"benchmarks.{module} {' '.join(argv)}"
            raise RuntimeError(f"{what}: {out['status']}; log {log_path}:\n{out['error']}")
        return out
    return {**json.loads(line.removeprefix(RESULT_PREFIX)), **out, "status": "ok"}
