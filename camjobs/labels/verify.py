"""`camjobs verify`: check that an output folder keeps the output contract.

Checks, each problem naming the files involved:
- every Parquet file under cams/ and errors/ is readable, in full, with a known schema version;
- no image (image_id and content_sha256) twice in cams/ for the same model and settings;
- every published run folder has its summary, and each summary's counts match its rows;
- nothing left half-done: staging folders or a lock are reported (a run may be in progress).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from camjobs.output import TABLES, OutputDir, read_run_summaries
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
    row_counts = _check_tables(out, report)
    _check_summaries(output, out, row_counts, report)
    staged = out.staged()
    if staged:
        report.notes.append(
            f"{out.staging()} holds {len(staged)} unpublished run(s): in progress, or left by a run "
            "that died (the next run removes them)"
        )
    if out.kind(out.lock) == pafs.FileType.File:
        report.notes.append(f"{out.lock} exists: a run is in progress, or died holding the lock")
    return report


def _check_tables(out: OutputDir, report: VerifyReport) -> dict[str, dict[str, int]]:
    """Read every Parquet file of cams/ and errors/; run_id -> its rows per table."""
    seen: dict[tuple, str] = {}
    row_counts: dict[str, dict[str, int]] = defaultdict(lambda: {"cams": 0, "errors": 0})
    for name in TABLES:
        for run_id, paths in sorted(out.run_parts(name).items()):
            for path in sorted(paths):
                table = _read(out, path, report)
                if table is None:
                    continue
                row_counts[run_id][name] += table.num_rows
                report.rows[name] += table.num_rows
                if name != "cams" or not table.num_rows:
                    continue
                # a version-1 file lacks the settings added since: their absence means SETTINGS_ADDED
                keys = zip(
                    *(
                        table[c].to_pylist() if c in table.column_names else [SETTINGS_ADDED[c]] * table.num_rows
                        for c in ("image_id", "content_sha256", *SETTINGS_COLUMNS)
                    )
                )
                for key in keys:
                    if key in seen:
                        report.problems.append(
                            f"image {key[0]!r} (content {str(key[1])[:12]}) appears twice for the "
                            f"same model and settings: {seen[key]} and {path}"
                        )
                    else:
                        seen[key] = path
    return row_counts


def _check_summaries(output: str, out: OutputDir, row_counts: dict[str, dict[str, int]], report: VerifyReport) -> None:
    """Every run with rows has a readable summary, whose counts match its rows."""
    summaries, unreadable = read_run_summaries(output)
    for run_id, why in sorted(unreadable.items()):
        report.problems.append(f"{out.summary(run_id)}: unreadable run summary ({why})")
    report.runs = len(summaries)
    for run_id in sorted(set(row_counts) - set(summaries)):
        report.problems.append(
            f"{out.table('cams', run_id)} or {out.table('errors', run_id)}: rows of run {run_id!r} "
            f"without a run summary in {out.runs}/"
        )
    for run_id, summary in sorted(summaries.items()):
        path = out.summary(run_id)
        version = summary.get("schema_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            report.problems.append(f"{path}: unknown schema version {version!r}")
        counts = summary.get("counts", {})
        for name, key in (("cams", "processed"), ("errors", "errors")):
            if counts.get(key) != row_counts[run_id][name]:
                report.problems.append(
                    f"{path}: says {key} = {counts.get(key)}, but {out.table(name, run_id)}/ "
                    f"holds {row_counts[run_id][name]} rows"
                )
