"""The output folder as a thing to read and write: its paths, its lock, its commit protocol, its readers.

    OUTPUT/cams/<run_id>/part-*.parquet      rows of CAMS_SCHEMA, one folder per published run
    OUTPUT/errors/<run_id>/part-*.parquet    rows of ERRORS_SCHEMA, likewise
    OUTPUT/runs/<run_id>.json                a run's summary, written last
    OUTPUT/_staging/<run_id>/{cams,errors}/  a run's rows while it writes them
    OUTPUT/_lock.json                        the run that is writing now

The commit protocol, which keeps half-finished runs invisible:
1. Write tasks (camjobs.pipeline.sink's Datasink) write each task's rows into _staging/<run_id>/. Readers
   never look there: pyarrow.dataset skips paths that start with "_" or ".".
2. When every row is written, the driver moves the staged folders into place, cams/<run_id>/ and
   errors/<run_id>/ (one rename each on a local disk). A write that fails drops its staging.
3. Last, runs/<run_id>.json is written (temporary name, then a rename). A run without its
   summary did not finish.
Each run's folder always holds at least one file, empty if need be, so that cams/ and errors/
read as datasets with the full schema even when a run had no rows of a kind.

Needs pyarrow only (no torch, no Ray): the label tools (evaluate, export, viz, verify) read
through it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import operator
import os
import socket
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from camjobs.errors import JobError, UsageError
from camjobs.schema import CAMS_SCHEMA, ERRORS_SCHEMA, SETTINGS_ADDED, SETTINGS_COLUMNS
from camjobs.storage import open_filesystem

TABLES = {"cams": CAMS_SCHEMA, "errors": ERRORS_SCHEMA}
RUNS = "runs"
STAGING = "_staging"
LOCK_NAME = "_lock.json"

log = logging.getLogger(__name__)


class OutputLocked(JobError, RuntimeError):
    """Another run is writing to the same output."""


class NoResults(UsageError, ValueError):
    """The output has no cams/ folder: not a camjobs output, or no run has finished there yet."""


# --------------------------------------------------------------------------- paths
@dataclass(frozen=True)
class OutputDir:
    """An output folder: its pyarrow filesystem, its root there (no trailing "/") and its parts' paths."""

    fs: pafs.FileSystem
    root: str

    @classmethod
    def open(cls, output: str) -> OutputDir:
        """The folder of a local path or a URI (s3://, gs://, ...)."""
        fs, root = open_filesystem(output.rstrip("/") or "/")
        return cls(fs, root)

    def table(self, name: str, run_id: str | None = None) -> str:
        """cams/ or errors/, or one run's folder in it."""
        return f"{self.root}/{name}" if run_id is None else f"{self.root}/{name}/{run_id}"

    @property
    def runs(self) -> str:
        return f"{self.root}/{RUNS}"

    def summary(self, run_id: str) -> str:
        return f"{self.runs}/{run_id}.json"

    def staging(self, run_id: str | None = None) -> str:
        """_staging/, or one run's staging folder."""
        return f"{self.root}/{STAGING}" if run_id is None else f"{self.root}/{STAGING}/{run_id}"

    @property
    def lock(self) -> str:
        return f"{self.root}/{LOCK_NAME}"

    def kind(self, path: str) -> pafs.FileType:
        return self.fs.get_file_info(path).type

    def is_dir(self, path: str) -> bool:
        return self.kind(path) == pafs.FileType.Directory

    def run_parts(self, name: str) -> dict[str, list[str]]:
        """run_id -> its Parquet files, for cams/ or errors/ (run_id "" for files right in the table folder)."""
        table_dir = self.table(name)
        if not self.is_dir(table_dir):
            return {}
        runs: dict[str, list[str]] = defaultdict(list)
        for info in self.fs.get_file_info(pafs.FileSelector(table_dir, recursive=True)):
            if info.type == pafs.FileType.File and info.path.endswith(".parquet"):
                relative = info.path[len(table_dir) + 1 :]
                runs[relative.split("/", 1)[0] if "/" in relative else ""].append(info.path)
        return dict(runs)

    def staged(self) -> list[str]:
        """What _staging/ holds: the folders of runs writing now, or of runs that died before publishing."""
        if not self.is_dir(self.staging()):
            return []
        return [info.path for info in self.fs.get_file_info(pafs.FileSelector(self.staging()))]


def staging_dir(output: str, run_id: str) -> str:
    """Where a run's write tasks put its rows, spelled as `output` is (a URI stays a URI)."""
    return f"{output.rstrip('/')}/{STAGING}/{run_id}"


# --------------------------------------------------------------------------- staging and publishing
def drop_staging(output: str, run_id: str) -> None:
    """Delete a run's staged rows (a write that failed): never published, so no reader saw them."""
    out = OutputDir.open(output)
    if out.kind(out.staging(run_id)) != pafs.FileType.NotFound:
        out.fs.delete_dir(out.staging(run_id))
    _remove_empty_staging(out)


def publish_run(output: str, run_id: str, summary: dict) -> str:
    """Move a run's staged files into place, then write its summary. Returns the summary path."""
    out = OutputDir.open(output)
    staged = out.staging(run_id)
    for name, schema in TABLES.items():
        source, destination = f"{staged}/{name}", out.table(name, run_id)
        if out.kind(source) == pafs.FileType.NotFound:
            out.fs.create_dir(source, recursive=True)
        files = out.fs.get_file_info(pafs.FileSelector(source))
        if not any(f.path.endswith(".parquet") for f in files):
            pq.write_table(schema.empty_table(), f"{source}/part-empty.parquet", filesystem=out.fs)
        out.fs.create_dir(out.table(name), recursive=True)
        _move_dir(out.fs, source, destination)
    out.fs.create_dir(out.runs, recursive=True)
    summary_path = out.summary(run_id)
    temporary = f"{out.runs}/_{run_id}.json.tmp"
    with out.fs.open_output_stream(temporary) as stream:
        stream.write(json.dumps(summary, indent=2, sort_keys=True, default=str).encode())
    out.fs.move(temporary, summary_path)
    out.fs.delete_dir(staged)
    _remove_empty_staging(out)
    return summary_path if "://" in output else os.path.abspath(summary_path)


def _remove_empty_staging(out: OutputDir) -> None:
    """_staging/ itself once no run stages there: a finished output holds cams/, errors/ and runs/ only."""
    if isinstance(out.fs, pafs.LocalFileSystem):
        with contextlib.suppress(OSError):  # not empty (a run staging now) or already gone
            os.rmdir(out.staging())
    elif out.is_dir(out.staging()) and not out.staged():
        out.fs.delete_dir(out.staging())


def _move_dir(fs: pafs.FileSystem, source: str, destination: str) -> None:
    if isinstance(fs, pafs.LocalFileSystem):
        os.replace(source, destination)  # one atomic rename
        return
    # Object stores have no directory rename: move file by file; the summary written
    # afterwards is what marks the run as complete.
    for info in fs.get_file_info(pafs.FileSelector(source, recursive=True)):
        if info.type == pafs.FileType.File:
            fs.move(info.path, destination + info.path[len(source) :])


def _remove_stale_staging(out: OutputDir) -> None:
    """Staged files of runs that died before publishing: never published, so safe to drop."""
    for path in out.staged():
        log.warning("removing %s, left by a run that did not finish", path)
        out.fs.delete_dir(path) if out.is_dir(path) else out.fs.delete_file(path)


# --------------------------------------------------------------------------- the lock
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
    out = OutputDir.open(output)
    out.fs.create_dir(out.root, recursive=True)
    path = out.lock
    mine = {
        "run_id": run_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": datetime.now(timezone.utc).isoformat(),
    }
    payload = json.dumps(mine).encode()
    for attempt in range(2):
        holder = read_lock(out)
        if holder is None:
            if _create_exclusive(out.fs, path, payload):
                break
            continue
        stale = holder.get("host") == mine["host"] and not _pid_alive(int(holder.get("pid", -1)))
        if stale and attempt == 0 and isinstance(out.fs, pafs.LocalFileSystem):
            log.warning(
                "taking over the lock of run %s, whose process %s is gone", holder.get("run_id"), holder.get("pid")
            )
            out.fs.delete_file(path)
            continue
        raise OutputLocked(
            f"{output} is being written by run {holder.get('run_id')} (host {holder.get('host')}, "
            f"pid {holder.get('pid')}, since {holder.get('started_at')}); wait for it to finish, "
            f"or delete {path} if that run is dead"
        )
    else:
        raise OutputLocked(f"could not take the lock {path}")
    try:
        _remove_stale_staging(out)
        yield
    finally:
        if (read_lock(out) or {}).get("run_id") == run_id:
            out.fs.delete_file(path)


def read_lock(out: OutputDir) -> dict | None:
    """The holder of the output's lock (run_id, host, pid, started_at); None when no run holds it."""
    try:
        with out.fs.open_input_stream(out.lock) as stream:
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


# --------------------------------------------------------------------------- reading cams/
def _cams_dataset(out: OutputDir) -> pads.Dataset | None:
    if not out.is_dir(out.table("cams")):
        return None
    # Read through CAMS_SCHEMA: version-1 files come back with nulls in the columns added since.
    return pads.dataset(
        out.table("cams"), schema=CAMS_SCHEMA, filesystem=out.fs, format="parquet", exclude_invalid_files=False
    )


def open_cams(output: str) -> pads.Dataset:
    """OUTPUT/cams as one dataset of CAMS_SCHEMA, every published run in it; NoResults without cams/."""
    dataset = _cams_dataset(OutputDir.open(output))
    if dataset is None:
        raise NoResults(
            f"no results in {output}: {output.rstrip('/')}/cams does not exist "
            "(no cams/ folder: not a camjobs output, or run `camjobs run` first)"
        )
    return dataset


def newest_per_image(table: pa.Table) -> pa.Table:
    """One row per image_id: the one with the largest run_id (the newest run: run ids start with
    their UTC start time), sorted by image_id."""
    if table.num_rows == 0:
        return table
    order = pc.sort_indices(table, sort_keys=[("image_id", "ascending"), ("run_id", "descending")])
    table = table.take(order)
    # After this sort the first row of each image_id is the newest one.
    id_list = table["image_id"].to_pylist()
    keep = [i for i, image_id in enumerate(id_list) if i == 0 or image_id != id_list[i - 1]]
    return table.take(pa.array(keep, pa.int64()))


def read_newest_cams(output: str, columns: Sequence[str]) -> pa.Table:
    """The newest row per image_id of OUTPUT/cams, with only `columns` (plus image_id, run_id)."""
    wanted = list(dict.fromkeys(["image_id", "run_id", *columns]))
    return newest_per_image(open_cams(output).to_table(columns=wanted))


def _matches(name: str, value: Any) -> pc.Expression:
    """column == value, where a null setting (no --refine; a version-1 row) matches a null."""
    if value is None:
        return pc.field(name).is_null()
    return pc.field(name) == pa.scalar(value, CAMS_SCHEMA.field(name).type)


def settings_filter(settings: Mapping[str, Any]) -> pc.Expression:
    """The cams rows written with exactly these settings (schema.SETTINGS_COLUMNS; those a
    version-1 run summary lacks take their old meaning, schema.SETTINGS_ADDED)."""
    settings = {**SETTINGS_ADDED, **settings}
    if set(settings) != set(SETTINGS_COLUMNS):
        raise ValueError(f"settings must give exactly {SETTINGS_COLUMNS}, got {sorted(settings)}")
    return functools.reduce(operator.and_, (_matches(name, settings[name]) for name in SETTINGS_COLUMNS))


# --------------------------------------------------------------------------- incremental runs
def item_key(image_id: str, content_sha256: str) -> str:
    """An image's key for incremental runs: a changed file under the same name is another image."""
    return f"{image_id}\x00{content_sha256}"


def existing_keys(output: str, settings: dict[str, Any]) -> frozenset[str]:
    """Keys of the rows in OUTPUT/cams written with exactly these settings (none without cams/).

    The output-affecting settings (model fingerprint, method, threshold, target mode, input
    size, refinement) are part of the match, so any change reprocesses every image. Read once,
    with a column projection and the filter pushed down to Parquet: a run over 400k images
    makes no per-image round trip to the output."""
    condition = settings_filter(settings)
    dataset = _cams_dataset(OutputDir.open(output))
    if dataset is None:
        return frozenset()
    table = dataset.to_table(columns=["image_id", "content_sha256"], filter=condition)
    return frozenset(map(item_key, table["image_id"].to_pylist(), table["content_sha256"].to_pylist()))


# --------------------------------------------------------------------------- run summaries
def read_run_summaries(output: str, run_ids: Iterable[str] | None = None) -> tuple[dict[str, dict], dict[str, str]]:
    """The summaries (runs/<run_id>.json) of `run_ids`, or of every run that has one, as
    (run_id -> summary, run_id -> why it has none): a run without its summary did not finish."""
    out = OutputDir.open(output)
    if run_ids is None:
        listed = out.fs.get_file_info(pafs.FileSelector(out.runs)) if out.is_dir(out.runs) else []
        run_ids = [
            info.base_name[: -len(".json")]
            for info in listed
            if info.base_name.endswith(".json") and not info.base_name.startswith("_")
        ]
    summaries, missing = {}, {}
    for run_id in sorted(set(run_ids)):
        try:
            with out.fs.open_input_stream(out.summary(run_id)) as stream:
                summaries[run_id] = json.loads(stream.read().decode("utf-8"))
        except (OSError, ValueError) as exc:  # FileNotFoundError is an OSError
            missing[run_id] = str(exc)
    return summaries, missing
