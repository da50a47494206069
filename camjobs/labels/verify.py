"""`camjobs verify`: check that an output folder keeps the output contract.

Checks, each problem naming the files involved, over the live runs (camjobs.output.run_index, as
every reader sees them: not those superseded by an --overwrite run, nor one still publishing):
- every Parquet file under cams/ and errors/ is readable, in full, with a known schema version;
- no image (image_id and content_sha256) twice in cams/ for the same model and settings, unless
  the later of the two runs was written with --append (its summary's write_mode);
- every run with live rows has its summary, and each summary's counts match its rows (counted by the
  run_id column, so that a compaction's files, which hold rows of many runs, count for each; and the
  touched files an incremental run recorded in fingerprints/ its count of images skipped after hashing);
- nothing left half-done: staging folders, a run that is publishing or died doing so, superseded
  rows or files a compaction replaced not yet removed, or a lock are reported as notes (a run may be
  in progress).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from camjobs.config import WriteMode
from camjobs.output import FINGERPRINTS, TABLES, OutputDir, RunIndex, run_index
from camjobs.schema import SCHEMA_VERSION, SETTINGS_ADDED, SETTINGS_COLUMNS


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=lambda: {"cams": 0, "errors": 0})
    runs: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _read(out: OutputDir, path: str, report: VerifyReport) -> pa.Table | None:
    try:
        table = pq.read_table(path, filesystem=out.fs)
    except (OSError, pa.ArrowException) as exc:
        report.problems.append(f"{path}: unreadable Parquet file ({exc})")
        return None
    versions = set(table["schema_version"].to_pylist()) if "schema_version" in table.column_names else {None}
    unknown = {v for v in versions if v is None or v > SCHEMA_VERSION}
    if unknown and table.num_rows:
        report.problems.append(
            f"{path}: unknown schema version(s) {sorted(map(str, unknown))} (this camjobs knows up to {SCHEMA_VERSION})"
        )
    return table


def verify_output(output: str) -> VerifyReport:
    report = VerifyReport()
    out = OutputDir.open(output)
    if not out.is_dir(out.root):
        report.problems.append(f"{output}: no such output folder")
        return report
    index = run_index(output)
    row_counts = _check_tables(out, index, report)
    _check_summaries(out, index, row_counts, report)
    _note_unfinished(out, index, report)
    staged = out.staged()
    if staged:
        report.notes.append(
            f"{out.staging()} holds {len(staged)} unpublished run(s): in progress, or left by a run "
            "that died (the next run removes them)"
        )
    if out.kind(out.lock) == pafs.FileType.File:
        report.notes.append(f"{out.lock} exists: a run is in progress, or died holding the lock")
    return report


def _check_tables(out: OutputDir, index: RunIndex, report: VerifyReport) -> dict[str, dict[str, int]]:
    """Read every live Parquet file of cams/ and errors/ (and the row counts of fingerprints/); run_id (the
    column) -> its live rows per table."""
    keys: list[tuple[str, tuple, str]] = []  # (run_id, image key, path) of every live cams row
    row_counts: dict[str, dict[str, int]] = defaultdict(lambda: {"cams": 0, "errors": 0, FINGERPRINTS: 0})
    for run_id, paths in out.run_parts(FINGERPRINTS).items():
        for path in paths:
            try:
                row_counts[run_id][FINGERPRINTS] += pq.read_metadata(path, filesystem=out.fs).num_rows
            except (OSError, pa.ArrowException) as exc:
                report.problems.append(f"{path}: unreadable Parquet file ({exc})")
    for name in TABLES:
        for run_id, paths in sorted(out.run_parts(name).items()):
            for path in sorted(p for p in paths if index.is_live(out, name, p)):
                table = _read(out, path, report)
                if table is None:
                    continue
                # a compaction's file holds rows of many runs, each under its own run_id
                runs = table["run_id"].to_pylist() if "run_id" in table.column_names else [run_id] * table.num_rows
                live = [run not in index.hidden for run in runs]
                table, runs = table.filter(pa.array(live, pa.bool_())), [r for r, ok in zip(runs, live) if ok]
                for run in runs:
                    row_counts[run][name] += 1
                report.rows[name] += table.num_rows
                if name == "cams" and table.num_rows:
                    keys.extend((run, key, path) for run, key in zip(runs, _image_keys(table)))
    # run ids start with their UTC start time: in this order, a repeat is in the later run
    appended = _check_repeats(sorted(keys, key=lambda item: item[0]), index, report)
    if appended:
        report.notes.append(f"{appended} rows repeat images of earlier runs in --append runs (kept on purpose)")
    return row_counts


def _image_keys(table: pa.Table) -> list[tuple]:
    """(image, content, settings) of each row; a version-1 file lacks the settings added since: their
    absence means SETTINGS_ADDED."""
    return list(
        zip(
            *(
                table[c].to_pylist() if c in table.column_names else [SETTINGS_ADDED[c]] * table.num_rows
                for c in ("image_id", "content_sha256", *SETTINGS_COLUMNS)
            )
        )
    )


def _check_repeats(keys: list[tuple[str, tuple, str]], index: RunIndex, report: VerifyReport) -> int:
    """A repeated image key is a problem unless an --append run wrote it over an earlier run's row.
    Returns the accepted repeats."""
    seen: dict[tuple, tuple[str, str]] = {}  # key -> (run_id, path) of its first row
    accepted = 0
    for run_id, key, path in keys:
        if key not in seen:
            seen[key] = (run_id, path)
        elif seen[key][0] != run_id and index.write_mode(run_id) == WriteMode.APPEND:
            accepted += 1
        else:
            report.problems.append(
                f"image {key[0]!r} (content {str(key[1])[:12]}) appears twice for the "
                f"same model and settings: {seen[key][1]} and {path}"
            )
    return accepted


def _check_summaries(
    out: OutputDir, index: RunIndex, row_counts: dict[str, dict[str, int]], report: VerifyReport
) -> None:
    """Every live run with rows has a readable summary, whose counts match its rows."""
    for run_id, why in sorted(index.unreadable.items()):
        report.problems.append(f"{out.summary(run_id)}: unreadable run summary ({why})")
    live = {
        run_id: summary
        for run_id, summary in index.summaries.items()
        if run_id not in index.hidden and run_id not in index.compactions
    }
    report.runs = len(live)
    for run_id in sorted(set(row_counts) - set(index.summaries)):
        report.problems.append(
            f"{out.table('cams', run_id)} or {out.table('errors', run_id)}: rows of run {run_id!r} "
            f"without a run summary in {out.runs}/"
        )
    for run_id, summary in sorted(live.items()):
        path = out.summary(run_id)
        version = summary.get("schema_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            report.problems.append(f"{path}: unknown schema version {version!r}")
        counts = summary.get("counts", {})
        checked = [("cams", "processed"), ("errors", "errors")]
        if "skipped_hash" in counts:  # schema version 4 on
            checked.append((FINGERPRINTS, "skipped_hash"))
        for name, key in checked:
            if counts.get(key) != row_counts[run_id][name]:
                report.problems.append(
                    f"{path}: says {key} = {counts.get(key)}, but {out.table(name)}/ "
                    f"holds {row_counts[run_id][name]} rows of run {run_id}"
                )


def _note_unfinished(out: OutputDir, index: RunIndex, report: VerifyReport) -> None:
    """Runs that readers skip and whose files are still there: in progress, or left by a run that died."""
    for run_id in sorted(index.publishing):
        report.notes.append(
            f"run {run_id} is publishing (its summary says so): in progress, or it died doing it (the next run "
            "removes it); its rows are not read"
        )
    leftover = sorted(r for r in index.superseded if any(out.is_dir(out.table(n, r)) for n in TABLES))
    if leftover:
        report.notes.append(
            f"rows of {len(leftover)} run(s) superseded by an --overwrite run are still there, not read "
            f"({', '.join(leftover)}): the next run removes them"
        )
    there = {path[len(out.root) + 1 :] for name in TABLES for path in out.parquet_files(out.table(name))}
    if there & index.replaced:
        report.notes.append(
            f"{len(there & index.replaced)} file(s) a compaction replaced are still there, not read: "
            "the next run or compaction removes them"
        )
