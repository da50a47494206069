"""Faults with real processes: killed actors, a killed driver, storage that fails under a run."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
from layout_fixtures import noise_jpegs

from camjobs.config import RunConfig
from camjobs.labels.verify import verify_output
from camjobs.lock import OutputLocked, output_lock
from camjobs.output import LOCK_NAME
from camjobs.pipeline.job import run_job

pytestmark = pytest.mark.slow


def _config(data: Path, output: Path, **overrides) -> RunConfig:
    values = dict(
        data=str(data),
        output=str(output),
        layout="folder",
        model="resnet18",
        classes=["a", "b"],
        input_size=96,
        batch_size=4,
    )
    values.update(overrides)
    return RunConfig(**values)


def _parquet_files(folder: Path) -> list[Path]:
    return list(folder.rglob("*.parquet")) if folder.exists() else []


def _kill_session(session_id: int) -> None:
    for _ in range(50):
        members = [pid for pid in _processes("") if _session_of(pid) == session_id]
        if not members:
            return
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _session_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[4])
    except (OSError, IndexError, ValueError):
        return None


def _processes(pattern: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if pattern in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_model_actor_killed_mid_run(ray_cluster, tmp_path):
    data, output = noise_jpegs(tmp_path / "data", 160), tmp_path / "out"
    killed: list[int] = []

    def kill_actor_once_busy() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            actors = _processes("CamPredictor")
            if actors and _parquet_files(output / "_staging"):  # some rows written: the run is well under way
                os.kill(actors[0], signal.SIGKILL)
                killed.append(actors[0])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_actor_once_busy)
    killer.start()
    result = run_job(_config(data, output, batch_size=2))
    killer.join()
    assert killed, "the actor was never seen running"
    cams = pd.read_parquet(output / "cams")
    assert result.summary["counts"]["processed"] == 160 and len(cams) == 160 and cams.image_id.is_unique
    assert verify_output(str(output)).ok


def test_driver_killed_mid_run_leaves_nothing_visible_and_next_run_completes(ray_cluster, tmp_path):
    data, output = noise_jpegs(tmp_path / "data", 240), tmp_path / "out"
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
        "96",
        "--batch-size",
        "2",
    ]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and driver.poll() is None and not _parquet_files(output / "_staging"):
            time.sleep(0.1)
        assert driver.poll() is None, "the driver finished before it could be killed"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        # The whole machine of that driver dies: its local Ray cluster, whose workers run in
        # process groups of their own, but all in the driver's session.
        _kill_session(driver.pid)
    assert (output / LOCK_NAME).exists()  # left behind by the dead driver
    assert not _parquet_files(output / "cams") and not _parquet_files(output / "errors")
    assert not (output / "runs").exists() or not list((output / "runs").glob("*.json"))

    # Nothing was published, so the next run's settings need not be the dead one's: small and quick ones.
    result = run_job(_config(data, output, incremental=True, input_size=32, batch_size=32))
    assert result.summary["counts"]["processed"] == 240
    assert not (output / "_staging").exists()  # the dead run's staging dropped, and the empty folder too
    assert len(pd.read_parquet(output / "cams")) == 240
    assert verify_output(str(output)).ok


@pytest.fixture
def small_disk(tmp_path):
    """A real 96 KiB file system (tmpfs), where the machine lets us mount one."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mountpoint)], capture_output=True
    ).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def test_full_disk_fails_clearly_and_keeps_earlier_runs(ray_cluster, small_disk, tmp_path, isic2017_mini):
    output = small_disk / "out"
    first = run_job(_config(noise_jpegs(tmp_path / "small", 3, size=(24, 32)), output, input_size=64))
    assert first.summary["counts"]["processed"] == 3
    big = noise_jpegs(tmp_path / "big", 48, size=(450, 600), seed=1)  # 48 full-size heatmaps do not fit in 96 KiB
    with pytest.raises(Exception) as caught:  # an overwrite that fails keeps the rows it was to replace
        run_job(_config(big, output, input_size=64, overwrite=True))
    assert "No space left" in str(caught.value) or "space" in str(caught.value).lower()
    report = verify_output(str(output))
    assert report.ok, report.problems
    assert report.rows == {"cams": 3, "errors": 0} and not (output / LOCK_NAME).exists()


def test_read_only_output_fails_clearly_and_keeps_earlier_runs(ray_cluster, tmp_path):
    disk = tmp_path / "ro"
    disk.mkdir()
    output = disk / "out"
    run_job(_config(noise_jpegs(tmp_path / "small", 2, size=(24, 32)), output, input_size=64))
    if subprocess.run(["mount", "--bind", "-o", "ro", str(disk), str(disk)], capture_output=True).returncode:
        pytest.skip("read-only bind mounts are not permitted here")
    try:
        with pytest.raises(OSError, match="Read-only"):
            run_job(_config(tmp_path / "small", output, input_size=64))
        assert verify_output(str(output)).ok and len(pd.read_parquet(output / "cams")) == 2
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_actor_failing_in_init_fails_the_job_fast(ray_cluster, tmp_path):
    """A checkpoint the actors cannot load (here: corrupt on the workers' side) fails the run, with its cause."""
    from camjobs.pipeline.predictor import ModelSpec

    data = noise_jpegs(tmp_path / "data", 8, size=(24, 32))
    corrupt = tmp_path / "model.pt"
    corrupt.write_bytes(b"\x80\x02 truncated checkpoint")

    # The driver's own check would stop a corrupt checkpoint before Ray starts; the driver loads a
    # good model here and only the actors get the corrupt one, so that the failure happens where it
    # can on a cluster: in each model actor's __init__.
    def corrupt_on_workers(stages):
        spec = ModelSpec(checkpoint=str(corrupt))
        return [dataclasses.replace(s, fn_constructor_args=(spec,)) if s.name == "predict" else s for s in stages]

    started = time.time()
    with pytest.raises(Exception, match="model.pt"):
        run_job(
            RunConfig(
                data=str(data),
                output=str(tmp_path / "out"),
                layout="folder",
                model="resnet18",
                classes=["a", "b"],
                input_size=64,
            ),
            adapt=corrupt_on_workers,
        )
    assert time.time() - started < 120
    assert not (tmp_path / "out" / "cams").exists() and not (tmp_path / "out" / LOCK_NAME).exists()


# --------------------------------------------------------------------------- signals: a run stopped cleanly
def _run_command(data: Path, output: Path) -> list[str]:
    return [
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
        "96",
        "--batch-size",
        "2",
    ]


def _session_members(session_id: int) -> list[str]:
    """What still runs in a session: "pid name" of each process."""
    members = []
    for pid in _processes(""):
        if _session_of(pid) == session_id:
            with contextlib.suppress(OSError):
                members.append(f"{pid} {Path(f'/proc/{pid}/comm').read_text().strip()}")
    return members


@pytest.mark.parametrize("signals", [("SIGINT",), ("SIGTERM",), ("SIGINT", "SIGINT"), ("SIGTERM", "SIGTERM")])
def test_a_signal_stops_a_run_cleanly(tmp_path, signals):
    """SIGINT as a terminal sends Ctrl-C (to the whole foreground process group, the local Ray cluster's
    raylet and GCS included), SIGTERM as kill, `ray job stop` and Kubernetes do (to the driver); once, or
    twice, the second while the run cleans up."""
    data, output = noise_jpegs(tmp_path / "data", 240), tmp_path / "out"
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}  # a cluster of its own
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("w") as stderr:
        driver = subprocess.Popen(
            _run_command(data, output), stdout=stderr, stderr=stderr, start_new_session=True, env=env
        )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and driver.poll() is None and not _parquet_files(output / "_staging"):
            time.sleep(0.1)
        assert driver.poll() is None, "the run finished before it could be stopped"
        (run_id,) = [p.name for p in (output / "_staging").iterdir()]
        for name in signals:
            signum = getattr(signal, name)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(driver.pid, signum) if signum == signal.SIGINT else os.kill(driver.pid, signum)
            time.sleep(0.3)
        driver.wait(timeout=120)
        leftovers = _session_members(driver.pid)
        for _ in range(100):  # Ray's workers notice their raylet is gone within a few seconds
            if not leftovers:
                break
            time.sleep(0.2)
            leftovers = _session_members(driver.pid)
    finally:
        _kill_session(driver.pid)
    err = stderr_path.read_text()
    assert driver.returncode == 128 + getattr(signal, signals[0]), err[-3000:]
    said = [line for line in err.splitlines() if line.startswith("camjobs:") and "interrupted" in line]
    assert said == [f"camjobs: error: run {run_id} interrupted by {signals[0]}: nothing was published"], err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert leftovers == [], f"processes of the stopped run still running: {leftovers}"
    assert not (output / LOCK_NAME).exists() and not (output / "_staging" / run_id).exists()
    assert not _parquet_files(output / "cams") and not (output / "runs").exists()


# --------------------------------------------------------------------------- the lock's lease across hosts
HOLDER = """
import sys, time
from camjobs.lock import output_lock
with output_lock(sys.argv[1], "holder-run", lease_s=float(sys.argv[2])):
    print("holding", flush=True)
    time.sleep(600)
"""


def _on_another_host(argv: list[str]) -> list[str]:
    """argv in a UTS namespace of its own, whose host name is other-host (root: unshare --uts; else
    an unprivileged user namespace, unshare -r --uts); skips the test where neither is allowed."""
    prefix = ["unshare", "--uts"] if os.geteuid() == 0 else ["unshare", "-r", "--uts"]
    probe = subprocess.run([*prefix, "hostname", "other-host"], capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"cannot make a UTS namespace here ({' '.join(prefix)}: {probe.stderr.strip()})")
    return [*prefix, "sh", "-c", 'hostname other-host && exec "$@"', "sh", *argv]


@contextlib.contextmanager
def _holder_on_another_host(output: Path, lease_s: float):
    """A real process on "other-host" that holds the output's lock, renewing it, until the block ends."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen(
        _on_another_host([sys.executable, "-c", HOLDER, str(output), str(lease_s)]),
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_a_live_holder_on_another_host_keeps_its_lock(tmp_path):
    output = tmp_path / "out"
    with _holder_on_another_host(output, lease_s=2.0):
        lock = json.loads((output / LOCK_NAME).read_text())
        assert (lock["host"], lock["run_id"], lock["lease_s"]) == ("other-host", "holder-run", 2.0)
        started = time.monotonic()
        with pytest.raises(OutputLocked, match="holder-run.*other-host"), output_lock(str(output), "here"):
            pass
        # refused when the holder renewed (every lease/3), before its lease could run out
        assert time.monotonic() - started < 2.0
        assert json.loads((output / LOCK_NAME).read_text())["run_id"] == "holder-run"


def test_a_killed_holder_on_another_host_is_taken_over_once_its_lease_runs_out(ray_cluster, tmp_path, caplog):
    data, output = noise_jpegs(tmp_path / "data", 3, size=(24, 32)), tmp_path / "out"
    with _holder_on_another_host(output, lease_s=2.0) as holder:
        holder.send_signal(signal.SIGKILL)  # no cleanup: the lock stays, as after an OOM kill or a lost node
        holder.wait()
        last = json.loads((output / LOCK_NAME).read_text())
    with caplog.at_level(logging.WARNING, logger="camjobs.output"):
        result = run_job(_config(data, output, input_size=64))
    assert result.summary["counts"]["processed"] == 3 and not (output / LOCK_NAME).exists()
    (warning,) = [r for r in caplog.records if "taking over" in r.getMessage()]
    message = warning.getMessage()
    assert all(part in message for part in ("holder-run", "other-host", f"pid {last['pid']}", "s ago"))
    # not before the lease had run out since the holder's last renewal
    renewed = datetime.fromisoformat(last["renewed_at"]).timestamp()
    assert warning.created >= renewed + last["lease_s"]
    assert verify_output(str(output)).ok
