"""The output's lock, OUTPUT/_lock.json, held by the run that writes: a lease it renews while it works.

Why a lease: a run killed outright (SIGKILL, the OOM killer, a lost node, a RayJob's head pod gone)
cannot release its lock, and the next run often starts on another host (a new head pod), where the
old process cannot be asked whether it lives. A lock not renewed for longer than its lease is
therefore free, from any host. Part of the output folder's protocol (camjobs.output: paths, staging,
publishing); pyarrow only, like it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow.fs as pafs

from camjobs.config import DEFAULT_LOCK_LEASE
from camjobs.errors import JobError
from camjobs.output import OutputDir, drop_staging, remove_unfinished

log = logging.getLogger(__name__)

UNREADABLE = "unknown (unreadable lock file)"  # the holder's run_id when the lock cannot be read
LOCK_SETTLE_S = 1.0  # object stores: how long a run that wrote the lock waits before reading back who won


class OutputLocked(JobError, RuntimeError):
    """Another run is writing to the same output."""


def _drop_unpublished(output: str, run_id: str) -> None:
    """Remove the staging of a run that ends without publishing (failed, interrupted); best effort: the
    run's own error is what it reports, and the next run removes what is left."""
    try:
        drop_staging(output, run_id)
    except OSError as exc:
        log.warning("could not remove the staging of run %s: %s", run_id, exc)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _seconds_since(stamp: Any, fallback: datetime | None) -> float | None:
    """Seconds from an ISO time (the lock's renewed_at) to now; `fallback` where it has none or an unreadable one."""
    try:
        when = datetime.fromisoformat(stamp) if isinstance(stamp, str) else fallback
    except ValueError:
        when = fallback
    if when is None:
        return None
    return (_now() - (when if when.tzinfo else when.replace(tzinfo=timezone.utc))).total_seconds()


@dataclass
class Lease:
    """A run's hold on OUTPUT/_lock.json: renewed on a thread every third of its lease while the run works.

    A holder that finds the lock no longer names it (taken over after it failed to renew in time: a
    paused machine, a storage outage) stops renewing; `check` then fails the run before it publishes."""

    out: OutputDir
    record: dict
    stopped: threading.Event = field(default_factory=threading.Event)
    lost_to: dict | None = None

    def keep(self) -> None:
        """The renewal loop (a daemon thread's target)."""
        while not self.stopped.wait(self.record["lease_s"] / 3):
            try:
                holder = read_lock(self.out)
                if (holder or {}).get("run_id") != self.record["run_id"]:
                    self.lost_to = holder or {"run_id": "nobody (the lock file is gone)"}
                    log.error("lost the lock %s to run %s", self.out.lock, self.lost_to.get("run_id"))
                    return
                self.record["renewed_at"] = _now().isoformat()
                _write_lock(self.out, self.record)
            except OSError as exc:  # storage hiccup: try again at the next renewal, within the lease
                log.warning("could not renew the lock %s: %s", self.out.lock, exc)

    def check(self) -> None:
        """Fail (OutputLocked) if another run took the lock over: publishing now could duplicate its rows.
        Read again here, not only at renewals: a short run may never renew."""
        holder = read_lock(self.out) or {"run_id": "nobody (the lock file is gone)"}
        if self.lost_to is None and holder.get("run_id") not in (self.record["run_id"], UNREADABLE):
            self.lost_to = holder
        if self.lost_to is not None:
            raise OutputLocked(
                f"run {self.record['run_id']} lost the lock {self.out.lock} to run {self.lost_to.get('run_id')} "
                f"(host {self.lost_to.get('host')}) and publishes nothing; rerun it"
            )


@contextmanager
def output_lock(output: str, run_id: str, lease_s: float = DEFAULT_LOCK_LEASE) -> Iterator[Lease]:
    """Hold OUTPUT/_lock.json as a lease for the duration of a run; refuse if another run holds it.

    The lock records its holder (host, pid, run id), its lease and its last renewal; the holder renews
    it every lease/3. It is taken over, with a warning naming the old holder, when its process is gone
    (same host) or when it has not been renewed for longer than its lease (any host: hosts' clocks are
    taken to agree to well within a lease, as NTP keeps them). A fresh lock of another host is watched
    until its lease runs out: renewed meanwhile, it is live and this run is refused. On a local disk
    the lock is created atomically (a hard link); object stores have no exclusive create, so there the
    last of the runs that start at the same moment wins (_create_last_writer_wins): best effort, and a
    scheduler should still not start two at once (the Kubernetes CronJob in deploy/ uses
    concurrencyPolicy: Forbid). A run that ends without publishing
    (failed, interrupted) has its staging removed here.
    """
    out = OutputDir.open(output)
    out.fs.create_dir(out.root, recursive=True)
    stamp = _now().isoformat()
    mine = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "started_at": stamp}
    lease = Lease(out, {**mine, "lease_s": float(lease_s), "renewed_at": stamp})
    _acquire(out, lease.record, output)
    renewer = threading.Thread(target=lease.keep, name=f"camjobs-lock-{run_id}", daemon=True)
    renewer.start()
    try:
        remove_unfinished(out)
        yield lease
    except BaseException:
        _drop_unpublished(output, run_id)
        raise
    finally:
        lease.stopped.set()
        renewer.join()
        if (read_lock(out) or {}).get("run_id") == run_id:
            out.fs.delete_file(out.lock)


def _acquire(out: OutputDir, record: dict, output: str) -> None:
    """Create the lock, taking over a stale one; OutputLocked if a live run holds it."""
    for _ in range(5):
        holder = read_lock(out)
        if holder is None:
            if _create_exclusive(out, record):
                return
            continue  # another run created it first: look at who
        why = _stale(out, holder, record["host"])
        if why is None and holder.get("host") != record["host"]:
            # Another host's process cannot be asked: watch its lock until the lease runs out.
            now = _watch(out, holder)
            if now is None or now.get("run_id") != holder.get("run_id"):
                continue  # released, or taken by another run meanwhile: look again
            why = None if now != holder else f"not renewed for its whole lease (watched from {record['host']})"
        if why is None:
            raise OutputLocked(
                f"{output} is being written by run {holder.get('run_id')} (host {holder.get('host')}, "
                f"pid {holder.get('pid')}, since {holder.get('started_at')}); wait for it to finish. The lock "
                f"of a run that died is taken over once its lease ({_lease_of(holder):g} s) runs out"
            )
        log.warning(
            "taking over the lock of run %s (host %s, pid %s, last renewed %s s ago): %s",
            holder.get("run_id"),
            holder.get("host"),
            holder.get("pid"),
            _age_text(out, holder),
            why,
        )
        if read_lock(out) == holder:  # still the stale one, not a newer holder's
            out.fs.delete_file(out.lock)
    raise OutputLocked(f"could not take the lock {out.lock}: other runs keep taking it")


def _lease_of(holder: dict) -> float:
    try:
        return float(holder.get("lease_s", DEFAULT_LOCK_LEASE))
    except (TypeError, ValueError):
        return DEFAULT_LOCK_LEASE


def _lock_age(out: OutputDir, holder: dict) -> float | None:
    """Seconds since the holder last renewed the lock (a lock of an older camjobs: since it started,
    else since the file was written)."""
    return _seconds_since(holder.get("renewed_at", holder.get("started_at")), out.fs.get_file_info(out.lock).mtime)


def _age_text(out: OutputDir, holder: dict) -> str:
    age = _lock_age(out, holder)
    return "an unknown number of" if age is None else f"{age:.0f}"


def _stale(out: OutputDir, holder: dict, host: str) -> str | None:
    """Why the holder's lock may be taken over at once; None while it may be live."""
    pid = holder.get("pid")
    if holder.get("host") == host and isinstance(pid, int) and not _pid_alive(pid):
        return f"its process {pid} on this host is gone"
    age = _lock_age(out, holder)
    if age is not None and age > _lease_of(holder):
        return f"not renewed for longer than its lease of {_lease_of(holder):g} s"
    return None


def _watch(out: OutputDir, holder: dict) -> dict | None:
    """The lock as it is once it changes, or once the holder's lease has run out unchanged (then it is
    `holder` itself); None if it was released."""
    lease_s, age = _lease_of(holder), _lock_age(out, holder)
    wait = lease_s if age is None else min(lease_s, max(0.0, lease_s - age))
    log.info(
        "the lock is held by run %s on host %s: waiting up to %.0f s for it to be renewed or to run out",
        holder.get("run_id"),
        holder.get("host"),
        wait,
    )
    deadline = time.monotonic() + wait
    while True:
        now = read_lock(out)
        if now != holder or time.monotonic() >= deadline:
            return now
        time.sleep(min(1.0, lease_s / 10, max(0.01, deadline - time.monotonic())))


def read_lock(out: OutputDir) -> dict | None:
    """The holder of the output's lock (run_id, host, pid, started_at, lease_s, renewed_at); None when no
    run holds it."""
    try:
        with out.fs.open_input_stream(out.lock) as stream:
            return json.loads(stream.read() or b"{}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"run_id": UNREADABLE}


def _write_lock(out: OutputDir, record: dict) -> None:
    """Rewrite the lock (a renewal): readers see the old record or the new one, never half of one."""
    payload = json.dumps(record).encode()
    if not isinstance(out.fs, pafs.LocalFileSystem):
        with out.fs.open_output_stream(out.lock) as stream:  # one PUT: atomic on object stores
            stream.write(payload)
        return
    temporary = f"{out.lock}.{record['run_id']}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(payload)
    os.replace(temporary, out.lock)


def _create_exclusive(out: OutputDir, record: dict) -> bool:
    """Create the lock unless it exists (local disk: a hard link of a complete file, atomic and
    exclusive; object stores: _create_last_writer_wins); False when another run's lock is there."""
    if not isinstance(out.fs, pafs.LocalFileSystem):
        return _create_last_writer_wins(out, record)
    temporary = f"{out.lock}.{record['run_id']}.new"
    with open(temporary, "wb") as handle:
        handle.write(json.dumps(record).encode())
    try:
        os.link(temporary, out.lock)
    except FileExistsError:
        return False
    finally:
        os.unlink(temporary)
    return True


def _create_last_writer_wins(out: OutputDir, record: dict) -> bool:
    """Object stores have no exclusive create that pyarrow can ask for: write the lock, give every run
    that found it free at the same moment LOCK_SETTLE_S to write its own, then read back who holds it.
    The last write wins and every one of them reads the same (S3 reads its writes, strongly consistent),
    so exactly one goes on. Best effort: a run paused between its look and its write for longer than
    that can still overwrite the winner's lock; the winner then finds another run there when it renews
    or before it publishes (Lease.check), and publishes nothing."""
    _write_lock(out, record)
    time.sleep(LOCK_SETTLE_S)
    return (read_lock(out) or {}).get("run_id") == record["run_id"]
