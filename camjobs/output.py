"""The output folder as a thing to read and write: its paths, its commit protocol, its readers.

    OUTPUT/cams/<run_id>/part-*.parquet      rows of CAMS_SCHEMA, one folder per published run (or
                                             compaction: rows of many runs, camjobs.compact)
    OUTPUT/errors/<run_id>/part-*.parquet    rows of ERRORS_SCHEMA, likewise
    OUTPUT/fingerprints/<run_id>/part-*.parquet  rows of FINGERPRINTS_SCHEMA: files an incremental run hashed
                                             and found unchanged, with their new fingerprint (done_rows)
    OUTPUT/runs/<run_id>.json                a run's summary: its commit record
    OUTPUT/_staging/<run_id>/{cams,errors}/  a run's rows while it writes them
    OUTPUT/_lock.json                        the run that is writing now: a lease it renews (camjobs.lock)

The commit protocol, which keeps half-finished runs invisible:
1. Write tasks (camjobs.pipeline.sink's Datasink) write each task's rows into _staging/<run_id>/, which
   merge_staged then rewrites into few large files. Readers never look there: pyarrow.dataset skips
   paths that start with "_" or ".".
2. When every row is written, the driver writes the run's summary with status "publishing", which hides
   the run's rows from the readers here, and moves the staged folders into place, cams/<run_id>/,
   errors/<run_id>/ and fingerprints/<run_id>/ where there is one (one rename each on a local disk, file
   by file on object stores). A write that fails drops its staging.
3. Last, the summary is rewritten with status "completed" (temporary name, then a rename; one PUT on
   object stores): the commit, one atomic step. A run without a completed summary did not finish.
Each run's folder always holds at least one file, empty if need be, so that cams/ and errors/
read as datasets with the full schema even when a run had no rows of a kind.

Write modes (camjobs.config.WriteMode): a run into an output that already holds rows for its model
and settings needs one (runs_to_replace). --overwrite replaces them: its summary lists the runs it
supersedes, so that the commit (step 3) shows the new rows and hides the old ones at once, and
readers see the old rows or the new, never neither and never both; their folders are deleted after
the commit (or by the next run, if this one dies in between), so that readers of the bare Parquet
files (pandas.read_parquet) see no duplicate either. A reader that listed the old files just before
the commit and opens them after the deletion gets FileNotFoundError (an error, never a wrong row);
reading again gives the new rows. --append keeps both, and says so in its summary.

Incremental runs (done_rows): an image is done when a live cams row has its id and the run's settings;
the listing skips it unopened where the file's fingerprint (size, mtime, ETag where both have one) is
that row's, and the decode stage hashes it where not. A touched file whose hash is still the row's is
skipped too, and its new fingerprint goes to fingerprints/<run_id>/, published with the run and read
by done_rows beside cams/ (for runs with the same settings, live as cams rows are), so that the next
run skips it unopened.

Which rows are live is decided here, once (run_index, live_dataset): every file in cams/ but those in
folders of runs still publishing (or that died publishing) or that a completed run superseded, and
those a completed compaction replaced (its summary's "replaces"); and of the rest, every row but those
whose run_id column names such a hidden run (a compaction's files hold rows of many runs). Every
reader, camjobs verify, export, evaluate and viz, reads through it. Needs pyarrow only (no torch, no Ray).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import operator
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from camjobs.config import WriteMode
from camjobs.errors import UsageError
from camjobs.parquet_files import DEFAULT_TARGET, FileTarget, rewrite, scan
from camjobs.schema import CAMS_SCHEMA, ERRORS_SCHEMA, FINGERPRINTS_SCHEMA, SETTINGS_ADDED, SETTINGS_COLUMNS
from camjobs.storage import open_filesystem

TABLES = {"cams": CAMS_SCHEMA, "errors": ERRORS_SCHEMA}
FINGERPRINTS = "fingerprints"  # touched files an incremental run found unchanged (done_rows)
RUN_FOLDERS = (*TABLES, FINGERPRINTS)  # the folders that hold a folder per run
RUNS = "runs"
STAGING = "_staging"
LOCK_NAME = "_lock.json"
PUBLISHING, COMPLETED = "publishing", "completed"  # a summary's status: before and after the commit
COMPACTION = "compaction"  # the `kind` of a compaction's summary (camjobs.compact); a run's has none

log = logging.getLogger(__name__)


class NoResults(UsageError, ValueError):
    """The output has no cams/ folder: not a camjobs output, or no run has finished there yet."""


class OutputExists(UsageError, ValueError):
    """The output holds rows for this model and these settings, and the run was given no write mode."""


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

    def parquet_files(self, folder: str) -> list[str]:
        """The Parquet files under a folder, sorted ([] where there is no such folder)."""
        if not self.is_dir(folder):
            return []
        listed = self.fs.get_file_info(pafs.FileSelector(folder, recursive=True))
        return sorted(i.path for i in listed if i.type == pafs.FileType.File and i.path.endswith(".parquet"))

    def num_rows(self, path: str) -> int:
        """A Parquet file's rows, from its footer."""
        with self.fs.open_input_file(path) as handle:
            return pq.read_metadata(handle).num_rows

    def run_parts(self, name: str) -> dict[str, list[str]]:
        """run_id -> its Parquet files, for cams/ or errors/ (run_id "" for files right in the table folder;
        a compaction's folder is named by its id)."""
        runs: dict[str, list[str]] = defaultdict(list)
        for path in self.parquet_files(self.table(name)):
            relative = path[len(self.table(name)) + 1 :]
            runs[relative.split("/", 1)[0] if "/" in relative else ""].append(path)
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


def merge_staged(output: str, run_id: str, target: FileTarget = DEFAULT_TARGET) -> dict[str, int]:
    """Rewrite a run's staged parts (one per write task) into few large files, streamed; returns the
    rows per table. Staging is invisible to readers, so no step of it needs to be atomic."""
    out, rows = OutputDir.open(output), {}
    for name, schema in TABLES.items():
        folder = f"{out.staging(run_id)}/{name}"
        files = out.parquet_files(folder)
        if len(files) <= 1:
            rows[name] = sum(out.num_rows(path) for path in files)
            continue
        merged = f"{folder}-merged"
        rows[name] = sum(count for _, count in rewrite(out.fs, scan(out.fs, files, schema), schema, merged, target))
        out.fs.delete_dir(folder)
        _move_dir(out.fs, merged, folder)
    return rows


def publish_run(output: str, run_id: str, summary: dict, on_step: Callable[[str], None] | None = None) -> str:
    """Move a run's staged files into place and commit its summary (the module's protocol); then delete
    the rows of the runs it supersedes (summary["supersedes"]) and the files a compaction replaces
    (summary["replaces"]). `on_step` hears "publishing" (files in place) and "committed". Returns the
    summary path."""
    out = OutputDir.open(output)
    staged = out.staging(run_id)
    out.fs.create_dir(out.runs, recursive=True)
    _write_summary(out, run_id, {**summary, "status": PUBLISHING})  # hides the rows while they move in
    for name, schema in TABLES.items():
        source, destination = f"{staged}/{name}", out.table(name, run_id)
        if out.kind(source) == pafs.FileType.NotFound:
            if summary.get("kind") == COMPACTION:
                continue  # a compaction leaves a table it did not rewrite as it is
            out.fs.create_dir(source, recursive=True)
        files = out.fs.get_file_info(pafs.FileSelector(source))
        if not any(f.path.endswith(".parquet") for f in files):
            pq.write_table(schema.empty_table(), f"{source}/part-empty.parquet", filesystem=out.fs)
        out.fs.create_dir(out.table(name), recursive=True)
        _move_dir(out.fs, source, destination)
    if out.is_dir(f"{staged}/{FINGERPRINTS}"):  # only an incremental run that found touched files has any
        out.fs.create_dir(out.table(FINGERPRINTS), recursive=True)
        _move_dir(out.fs, f"{staged}/{FINGERPRINTS}", out.table(FINGERPRINTS, run_id))
    if on_step:
        on_step("publishing")
    summary_path = _write_summary(out, run_id, {**summary, "status": summary.get("status", COMPLETED)})
    if on_step:
        on_step("committed")
    out.fs.delete_dir(staged)
    _remove_empty_staging(out)
    _delete_rows(out, summary.get("supersedes", ()), "superseded by run " + run_id)
    replaced = [f"{name}/{path}" for name, paths in summary.get("replaces", {}).items() for path in paths]
    _delete_files(out, replaced, "replaced by compaction " + run_id)
    return summary_path if "://" in output else os.path.abspath(summary_path)


def _write_summary(out: OutputDir, run_id: str, summary: dict) -> str:
    """Write runs/<run_id>.json in one step: readers see the old file or the new one."""
    temporary = f"{out.runs}/_{run_id}.json.tmp"
    with out.fs.open_output_stream(temporary) as stream:
        stream.write(json.dumps(summary, indent=2, sort_keys=True, default=str).encode())
    out.fs.move(temporary, out.summary(run_id))
    return out.summary(run_id)


def _delete_rows(out: OutputDir, run_ids: Iterable[str], why: str) -> None:
    """Delete runs' folders in cams/ and errors/ that readers already skip; best effort, since they stay
    hidden, and the next run tries again (remove_unfinished)."""
    for run_id in run_ids:
        for name in RUN_FOLDERS:
            folder = out.table(name, run_id)
            try:
                if out.is_dir(folder):
                    log.info("removing %s (%s)", folder, why)
                    out.fs.delete_dir(folder)
            except OSError as exc:
                log.warning("could not remove %s (%s): %s", folder, why, exc)


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


def remove_unfinished(out: OutputDir) -> None:
    """What runs that died left behind, which readers already skip: staged files, the rows and summary
    of a run that died while publishing, the rows of superseded runs. Only under the lock."""
    for path in out.staged():
        log.warning("removing %s, left by a run that did not finish", path)
        out.fs.delete_dir(path) if out.is_dir(path) else out.fs.delete_file(path)
    _remove_empty_staging(out)
    index = _run_index(out)
    for run_id in sorted(index.publishing):
        log.warning("removing run %s, which died while it published", run_id)
        _delete_rows(out, [run_id], "died while it published")
        out.fs.delete_file(out.summary(run_id))
    _delete_rows(out, sorted(index.superseded & _run_folders(out)), "superseded")
    _delete_files(out, index.replaced, "replaced by a compaction")


def _delete_files(out: OutputDir, relative: Iterable[str], why: str) -> None:
    """Delete files of cams/ and errors/ (paths relative to the root) that readers already skip, and
    their folders once empty; best effort, like _delete_rows."""
    wanted = set(relative)
    if not wanted:
        return
    folders = set()
    for name in TABLES:
        for path in out.parquet_files(out.table(name)):
            if path[len(out.root) + 1 :] in wanted:
                try:
                    out.fs.delete_file(path)
                    folders.add(path.rsplit("/", 1)[0])
                except OSError as exc:
                    log.warning("could not remove %s (%s): %s", path, why, exc)
    if folders:
        log.info("removed files of %d folder(s) (%s)", len(folders), why)
    for folder in sorted(folders):
        with contextlib.suppress(OSError):
            if not out.parquet_files(folder) and folder.rsplit("/", 1)[0] in {out.table(n) for n in TABLES}:
                out.fs.delete_dir(folder)


def _run_folders(out: OutputDir) -> set[str]:
    return {run_id for name in RUN_FOLDERS for run_id in out.run_parts(name)}


# --------------------------------------------------------------------------- which runs are live
@dataclass(frozen=True)
class RunIndex:
    """The output's runs as their summaries say: which are live, and how each was written."""

    summaries: dict[str, dict]  # run_id -> its summary, every readable one (compactions' too)
    unreadable: dict[str, str]  # run_id -> why its summary cannot be read
    publishing: frozenset[str]  # runs publishing now, or that died doing it: not yet committed
    superseded: frozenset[str]  # runs whose rows a committed --overwrite run replaced
    replaced: frozenset[str] = frozenset()  # files ("cams/<folder>/<file>") a committed compaction rewrote

    @property
    def hidden(self) -> frozenset[str]:
        """Runs whose rows no reader sees (by the folder or, in a compaction's files, the run_id column)."""
        return self.publishing | self.superseded

    @property
    def compactions(self) -> frozenset[str]:
        """The ids of the compactions (camjobs.compact) among the summaries: they hold no rows of their own."""
        return frozenset(run for run, summary in self.summaries.items() if summary.get("kind") == COMPACTION)

    def is_live(self, out: OutputDir, name: str, path: str) -> bool:
        """Whether readers read this file of cams/ or errors/ (the rows of hidden runs in it aside)."""
        return _run_of(out, name, path) not in self.hidden and path[len(out.root) + 1 :] not in self.replaced

    def write_mode(self, run_id: str) -> str:
        """How the run was written (error: no mode, as every run before write modes existed)."""
        return str(self.summaries.get(run_id, {}).get("write_mode", WriteMode.ERROR))


def run_index(output: str) -> RunIndex:
    """Every run summary of OUTPUT/runs, and which runs' rows are live."""
    return _run_index(OutputDir.open(output))


def _run_index(out: OutputDir) -> RunIndex:
    summaries, unreadable = _read_summaries(out, None)
    publishing = frozenset(run for run, summary in summaries.items() if summary.get("status") == PUBLISHING)
    committed = {run: summary for run, summary in summaries.items() if run not in publishing}
    superseded = frozenset(old for summary in committed.values() for old in summary.get("supersedes", ()))
    replaced = frozenset(
        f"{name}/{path}"
        for summary in committed.values()
        if summary.get("kind") == COMPACTION
        for name, paths in summary.get("replaces", {}).items()
        for path in paths
    )
    return RunIndex(summaries, unreadable, publishing, superseded, replaced)


def _run_of(out: OutputDir, name: str, path: str) -> str:
    """The run of a file in cams/ or errors/: its folder there ("" for a file right in the table folder)."""
    relative = path[len(out.table(name)) + 1 :]
    return relative.split("/", 1)[0] if "/" in relative else ""


def _summary_stamps(out: OutputDir) -> frozenset[tuple]:
    """Name, size and mtime of every file in runs/: a summary written or rewritten changes them."""
    if not out.is_dir(out.runs):
        return frozenset()
    return frozenset((i.base_name, i.size, i.mtime_ns) for i in out.fs.get_file_info(pafs.FileSelector(out.runs)))


# --------------------------------------------------------------------------- reading cams/
def _cams_dataset(out: OutputDir, index: RunIndex | None = None) -> pads.Dataset | None:
    """The live rows of cams/ (run_index); None without cams/."""
    return live_dataset(out, "cams", index)


def live_dataset(out: OutputDir, name: str, index: RunIndex | None = None) -> pads.Dataset | None:
    """The live rows of cams/ or errors/: the files of live runs and compactions, less the rows of hidden
    runs in a compaction's files; None without the folder. Without `index` (a reader that holds no lock)
    the summaries are read around the listing until runs/ stays the same, so that the index and the files
    are of one moment: the rows before a commit or after it, never neither or both."""
    if not out.is_dir(out.table(name)):
        return None
    for _ in range(10):
        before = _summary_stamps(out) if index is None else frozenset()
        current = index or _run_index(out)
        # Read through the table's schema: version-1 files come back with nulls in the columns added since.
        dataset = pads.dataset(
            out.table(name), schema=TABLES[name], filesystem=out.fs, format="parquet", exclude_invalid_files=False
        )
        if index is not None or _summary_stamps(out) == before:
            break
    else:
        raise OSError(f"{out.runs} kept changing while {out.table(name)} was listed: read again")
    live = [path for path in dataset.files if current.is_live(out, name, path)]
    if len(live) != len(dataset.files):
        dataset = pads.dataset(
            live, schema=TABLES[name], filesystem=out.fs, format="parquet", exclude_invalid_files=False
        )
    if current.hidden:
        dataset = dataset.filter(pc.invert(pc.field("run_id").isin(sorted(current.hidden))))
    return dataset


def open_cams(output: str) -> pads.Dataset:
    """OUTPUT/cams as one dataset of CAMS_SCHEMA, every live run in it (run_index); NoResults without cams/."""
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
DONE_COLUMNS = ("image_id", "content_sha256", "file_size", "file_mtime_ns", "file_etag")


def done_rows(output: str, settings: Mapping[str, Any]) -> pa.Table:
    """What an incremental run has done before: (image_id, content_sha256, file_size, file_mtime_ns,
    file_etag) of every live cams row written with exactly these settings, and of the fingerprints/ rows
    of live runs with these settings (touched files found unchanged). An empty table without cams/.

    The output-affecting settings (model fingerprint, method, threshold, target mode, input size,
    refinement) are part of the match, so any change reprocesses every image. Read once, as Arrow, with
    a column projection and the filter pushed down to Parquet: no per-image round trip, no Python set."""
    condition = settings_filter(settings)
    out = OutputDir.open(output)
    schema = pa.schema([CAMS_SCHEMA.field(name) for name in DONE_COLUMNS])
    index = _run_index(out)
    dataset = _cams_dataset(out, index)
    if dataset is None:
        return schema.empty_table()
    tables = [dataset.to_table(columns=list(DONE_COLUMNS), filter=condition)]
    runs = {run for run, summary in index.summaries.items() if _same_settings(summary, settings)} - index.hidden
    files = [path for run, paths in out.run_parts(FINGERPRINTS).items() if run in runs for path in paths]
    if files:
        touched = pads.dataset(files, schema=FINGERPRINTS_SCHEMA, filesystem=out.fs, format="parquet")
        tables.append(touched.to_table(columns=list(DONE_COLUMNS)))
    return pa.concat_tables([t.cast(schema) for t in tables])


def _same_settings(summary: dict, settings: Mapping[str, Any]) -> bool:
    """A run's summary says it was written with exactly these settings."""
    theirs, wanted = summary.get("settings"), {**SETTINGS_ADDED, **settings}
    return isinstance(theirs, dict) and all({**SETTINGS_ADDED, **theirs}.get(k) == wanted[k] for k in wanted)


# --------------------------------------------------------------------------- write modes
def runs_with_settings(out: OutputDir, settings: Mapping[str, Any], index: RunIndex) -> list[str]:
    """The live runs written with exactly these settings: their cams rows say so, or their summary
    does (a run whose every input failed has no cams rows)."""
    dataset, found = _cams_dataset(out, index), set()
    if dataset is not None:
        found.update(dataset.to_table(columns=["run_id"], filter=settings_filter(settings))["run_id"].to_pylist())
    found.update(run_id for run_id, summary in index.summaries.items() if _same_settings(summary, settings))
    return sorted(run for run in found - index.hidden if run is not None)


def runs_to_replace(output: str, settings: Mapping[str, Any], mode: str) -> tuple[str, ...]:
    """The runs a run in this write mode supersedes: with --overwrite those of its model and settings,
    otherwise none. Without a mode, OutputExists where there are any: a second set of rows for the
    same images must be asked for."""
    out = OutputDir.open(output)
    if mode in (WriteMode.INCREMENTAL, WriteMode.APPEND) or not out.is_dir(out.root):
        return ()
    runs = runs_with_settings(out, settings, _run_index(out))
    if mode == WriteMode.OVERWRITE or not runs:
        return tuple(runs)
    raise OutputExists(
        f"{output} already holds rows for this model ({str(settings.get('model_sha256'))[:12]}) and these "
        f"settings, from run(s) {', '.join(runs)}: give --incremental to process only the images without a "
        "row, --overwrite to replace those rows, or --append to add a second set beside them"
    )


# --------------------------------------------------------------------------- run summaries
def read_run_summaries(output: str, run_ids: Iterable[str] | None = None) -> tuple[dict[str, dict], dict[str, str]]:
    """The summaries (runs/<run_id>.json) of `run_ids`, or of every run that has one, as
    (run_id -> summary, run_id -> why it has none): a run without its summary did not finish."""
    return _read_summaries(OutputDir.open(output), run_ids)


def _read_summaries(out: OutputDir, run_ids: Iterable[str] | None) -> tuple[dict[str, dict], dict[str, str]]:
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
