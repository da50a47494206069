"""`camjobs verify`: check that an output folder keeps the output contract.

Checks, each problem naming the files involved:
- every Parquet file under cams/ and errors/ is readable, in full, with a known schema version;
- no image (image_id and content_sha256) twice in cams/ for the same model and settings;
- every published run folder has its summary, and each summary's counts match its rows;
- nothing left half-done: staging folders or a lock are reported (a run may be in progress).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from camjobs.schema import SCHEMA_VERSION, SETTINGS_ADDED, SETTINGS_COLUMNS
from camjobs.sink import LOCK_NAME, TABLES
from camjobs.storage import open_filesystem


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=lambda: {"cams": 0, "errors": 0})
    runs: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _run_folders(fs: pafs.FileSystem, table_dir: str) -> dict[str, list[str]]:
    """run_id -> its Parquet files, for one of cams/ or errors/."""
    if fs.get_file_info(table_dir).type != pafs.FileType.Directory:
        return {}
    runs: dict[str, list[str]] = defaultdict(list)
    for info in fs.get_file_info(pafs.FileSelector(table_dir, recursive=True)):
        if info.type == pafs.FileType.File and info.path.endswith(".parquet"):
            relative = info.path[len(table_dir) + 1 :]
            runs[relative.split("/", 1)[0] if "/" in relative else ""].append(info.path)
    return runs


def _read(fs: pafs.FileSystem, path: str, report: VerifyReport) -> pa.Table | None:
    try:
        table = pq.read_table(path, filesystem=fs)
    except (OSError, pa.ArrowException) as exc:
        report.problems.append(f"{path}: unreadable Parquet file ({exc})")
        return None
    versions = set(table["schema_version"].to_pylist()) if "schema_version" in table.column_names else {None}
    unknown = {v for v in versions if v is None or v > SCHEMA_VERSION}
    if unknown and table.num_rows:
        report.problems.append(f"{path}: unknown schema version(s) {sorted(map(str, unknown))} (this camjobs knows up to {SCHEMA_VERSION})")
    return table


def verify_output(output: str) -> VerifyReport:
    report = VerifyReport()
    fs, root = open_filesystem(output.rstrip("/"))
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        report.problems.append(f"{output}: no such output folder")
        return report

    seen: dict[tuple, str] = {}
    row_counts: dict[str, dict[str, int]] = defaultdict(lambda: {"cams": 0, "errors": 0})
    for name in TABLES:
        for run_id, paths in sorted(_run_folders(fs, f"{root}/{name}").items()):
            for path in sorted(paths):
                table = _read(fs, path, report)
                if table is None:
                    continue
                row_counts[run_id][name] += table.num_rows
                report.rows[name] += table.num_rows
                if name != "cams" or not table.num_rows:
                    continue
                # a version-1 file lacks the settings added since: their absence means SETTINGS_ADDED
                keys = zip(*(table[c].to_pylist() if c in table.column_names else [SETTINGS_ADDED[c]] * table.num_rows
                             for c in ("image_id", "content_sha256", *SETTINGS_COLUMNS)))
                for key in keys:
                    if key in seen:
                        report.problems.append(
                            f"image {key[0]!r} (content {str(key[1])[:12]}) appears twice for the same model and settings: {seen[key]} and {path}"
                        )
                    else:
                        seen[key] = path

    summaries = {}
    if fs.get_file_info(f"{root}/runs").type == pafs.FileType.Directory:
        for info in fs.get_file_info(pafs.FileSelector(f"{root}/runs")):
            if info.base_name.endswith(".json") and not info.base_name.startswith("_"):
                try:
                    with fs.open_input_stream(info.path) as stream:
                        summaries[info.base_name[: -len(".json")]] = (info.path, json.loads(stream.read()))
                except (OSError, ValueError) as exc:
                    report.problems.append(f"{info.path}: unreadable run summary ({exc})")
    report.runs = len(summaries)
    for run_id in sorted(set(row_counts) - set(summaries)):
        report.problems.append(f"{root}/cams/{run_id} or {root}/errors/{run_id}: rows of run {run_id!r} without a run summary in {root}/runs/")
    for run_id, (path, summary) in sorted(summaries.items()):
        version = summary.get("schema_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            report.problems.append(f"{path}: unknown schema version {version!r}")
        counts = summary.get("counts", {})
        for name, key in (("cams", "processed"), ("errors", "errors")):
            if counts.get(key) != row_counts[run_id][name]:
                report.problems.append(
                    f"{path}: says {key} = {counts.get(key)}, but {root}/{name}/{run_id}/ holds {row_counts[run_id][name]} rows"
                )

    if fs.get_file_info(f"{root}/_staging").type == pafs.FileType.Directory:
        staged = fs.get_file_info(pafs.FileSelector(f"{root}/_staging"))
        if staged:
            report.notes.append(f"{root}/_staging holds {len(staged)} unpublished run(s): in progress, or left by a run that died (the next run removes them)")
    if fs.get_file_info(f"{root}/{LOCK_NAME}").type == pafs.FileType.File:
        report.notes.append(f"{root}/{LOCK_NAME} exists: a run is in progress, or died holding the lock")
    return report
