"""The Parquet sink and the commit protocol that keeps half-finished runs invisible.

1. Write tasks (a Ray Data Datasink) write each task's rows into
   OUTPUT/_staging/<run_id>/{cams,errors}/part-*.parquet. Readers never look there:
   pyarrow.dataset skips paths that start with "_" or ".".
2. When every row is written, the driver moves the staged folders into place:
   OUTPUT/cams/<run_id>/ and OUTPUT/errors/<run_id>/ (one rename each on a local disk).
3. Last, OUTPUT/runs/<run_id>.json is written (temporary name, then a rename). A run
   without its summary did not finish.
Each run's folder always holds at least one file, empty if need be, so that DIR/cams and
DIR/errors read as datasets with the full schema even when a run had no rows of a kind.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasink

from camjobs.storage import open_filesystem
from camjobs.schema import CAMS_SCHEMA, ERRORS_SCHEMA

TABLES = {"cams": CAMS_SCHEMA, "errors": ERRORS_SCHEMA}
LOCK_NAME = "_lock.json"

log = logging.getLogger(__name__)


class OutputLocked(RuntimeError):
    """Another run is writing to the same output."""


def staging_dir(output: str, run_id: str) -> str:
    return f"{output.rstrip('/')}/_staging/{run_id}"


@dataclass
class SinkStats:
    processed: int = 0
    errors: int = 0
    skipped: int = 0
    refine_failed: int = 0  # cams rows whose refinement failed (their CAM columns are intact)
    rows_per_node: Counter = field(default_factory=Counter)
    error_types: Counter = field(default_factory=Counter)

    def add(self, other: "SinkStats") -> None:
        self.processed += other.processed
        self.errors += other.errors
        self.skipped += other.skipped
        self.refine_failed += other.refine_failed
        self.rows_per_node.update(other.rows_per_node)
        self.error_types.update(other.error_types)


class CamParquetSink(Datasink[SinkStats]):
    """Splits result rows into cams and errors and writes both to the staging folder."""

    def __init__(self, output: str, run_id: str):
        self.staging = staging_dir(output, run_id)
        self.stats: SinkStats | None = None

    def write(self, blocks: Iterable[pa.Table], ctx: Any) -> SinkStats:
        fs, base = open_filesystem(self.staging)
        part = f"part-{getattr(ctx, 'task_idx', 0):05d}-{uuid.uuid4().hex[:8]}.parquet"
        writers: dict[str, pq.ParquetWriter] = {}
        stats = SinkStats()
        try:
            for block in blocks:
                table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block, preserve_index=False)
                skipped = table["skipped"].fill_null(False)
                stats.skipped += pc.sum(skipped.cast(pa.int64())).as_py() or 0
                table = table.filter(pc.invert(skipped))
                failed = pc.is_valid(table["error_type"])
                parts = {"cams": table.filter(pc.invert(failed)), "errors": table.filter(failed)}
                for name, rows in parts.items():
                    if rows.num_rows == 0:
                        continue
                    if name not in writers:
                        fs.create_dir(f"{base}/{name}", recursive=True)
                        writers[name] = pq.ParquetWriter(f"{base}/{name}/{part}", TABLES[name], filesystem=fs)
                    writers[name].write_table(rows.select(TABLES[name].names).cast(TABLES[name]))
                stats.processed += parts["cams"].num_rows
                stats.errors += parts["errors"].num_rows
                stats.refine_failed += parts["cams"].num_rows - parts["cams"]["refine_error"].null_count
                stats.rows_per_node.update(str(n) for n in parts["cams"]["node_id"].to_pylist())
                stats.error_types.update(parts["errors"]["error_type"].to_pylist())
        finally:
            for writer in writers.values():
                writer.close()
        return stats

    def on_write_complete(self, write_result) -> None:
        self.stats = SinkStats()
        for task_stats in write_result.write_returns:
            self.stats.add(task_stats)


def publish_run(output: str, run_id: str, summary: dict) -> str:
    """Move a run's staged files into place, then write its summary. Returns the summary path."""
    fs, root = open_filesystem(output.rstrip("/"))
    staged = f"{root}/_staging/{run_id}"
    for name, schema in TABLES.items():
        source, destination = f"{staged}/{name}", f"{root}/{name}/{run_id}"
        if fs.get_file_info(source).type == pafs.FileType.NotFound:
            fs.create_dir(source, recursive=True)
        files = fs.get_file_info(pafs.FileSelector(source))
        if not any(f.path.endswith(".parquet") for f in files):
            pq.write_table(schema.empty_table(), f"{source}/part-empty.parquet", filesystem=fs)
        fs.create_dir(f"{root}/{name}", recursive=True)
        _move_dir(fs, source, destination)
    fs.create_dir(f"{root}/runs", recursive=True)
    summary_path = f"{root}/runs/{run_id}.json"
    temporary = f"{root}/runs/_{run_id}.json.tmp"
    with fs.open_output_stream(temporary) as stream:
        stream.write(json.dumps(summary, indent=2, sort_keys=True, default=str).encode())
    fs.move(temporary, summary_path)
    fs.delete_dir(staged)
    return summary_path if "://" in output else os.path.abspath(summary_path)


def _move_dir(fs: pafs.FileSystem, source: str, destination: str) -> None:
    if isinstance(fs, pafs.LocalFileSystem):
        os.replace(source, destination)  # one atomic rename
        return
    # Object stores have no directory rename: move file by file; the summary written
    # afterwards is what marks the run as complete.
    for info in fs.get_file_info(pafs.FileSelector(source, recursive=True)):
        if info.type == pafs.FileType.File:
            fs.move(info.path, destination + info.path[len(source):])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def output_lock(output: str, run_id: str) -> Iterator[None]:
    """Hold OUTPUT/_lock.json for the duration of a run; refuse if another run holds it.

    On a local disk the lock is created atomically (O_EXCL), and a lock left by a dead
    process on this host is taken over. Object stores have no exclusive create: there the
    check is best effort, and a scheduler should not start two runs at once (the
    Kubernetes CronJob in deploy/ uses concurrencyPolicy: Forbid).
    """
    fs, root = open_filesystem(output.rstrip("/"))
    fs.create_dir(root, recursive=True)
    path = f"{root}/{LOCK_NAME}"
    mine = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
            "started_at": datetime.now(timezone.utc).isoformat()}
    payload = json.dumps(mine).encode()
    for attempt in range(2):
        holder = _read_lock(fs, path)
        if holder is None:
            if _create_exclusive(fs, path, payload):
                break
            continue
        stale = holder.get("host") == mine["host"] and not _pid_alive(int(holder.get("pid", -1)))
        if stale and attempt == 0 and isinstance(fs, pafs.LocalFileSystem):
            log.warning("taking over the lock of run %s, whose process %s is gone", holder.get("run_id"), holder.get("pid"))
            fs.delete_file(path)
            continue
        raise OutputLocked(
            f"{output} is being written by run {holder.get('run_id')} (host {holder.get('host')}, pid {holder.get('pid')}, "
            f"since {holder.get('started_at')}); wait for it to finish, or delete {path} if that run is dead"
        )
    else:
        raise OutputLocked(f"could not take the lock {path}")
    try:
        _remove_stale_staging(fs, root)
        yield
    finally:
        if (_read_lock(fs, path) or {}).get("run_id") == run_id:
            fs.delete_file(path)


def _read_lock(fs: pafs.FileSystem, path: str) -> dict | None:
    try:
        with fs.open_input_stream(path) as stream:
            return json.loads(stream.read() or b"{}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"run_id": "unknown (unreadable lock file)"}


def _create_exclusive(fs: pafs.FileSystem, path: str, payload: bytes) -> bool:
    if isinstance(fs, pafs.LocalFileSystem):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(payload)
        return True
    with fs.open_output_stream(path) as stream:
        stream.write(payload)
    return True


def _remove_stale_staging(fs: pafs.FileSystem, root: str) -> None:
    """Staged files of runs that died before publishing: never published, so safe to drop."""
    staging = f"{root}/_staging"
    if fs.get_file_info(staging).type != pafs.FileType.Directory:
        return
    for info in fs.get_file_info(pafs.FileSelector(staging)):
        log.warning("removing %s, left by a run that did not finish", info.path)
        fs.delete_dir(info.path) if info.type == pafs.FileType.Directory else fs.delete_file(info.path)
