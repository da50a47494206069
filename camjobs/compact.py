"""`camjobs compact`: a grown cams/ and errors/ rewritten into few large files, atomically, exactly once.

Nightly runs each add a folder of files; compaction rewrites the small ones into files of
parquet_files.FileTarget, under the output's lock (camjobs.lock) and through the publish protocol
of camjobs.output:
1. the files to rewrite, per table: every live file under half the target, and every file that holds
   rows of hidden runs; a table is left alone where that is at most one file without such rows, so a
   compact of a compacted output does nothing;
2. their live rows, every column as it is (each row keeps its run_id), streamed into
   _staging/<compaction_id>/ (hidden from readers);
3. output.publish_run with a summary of kind "compaction" that lists the files it replaces: its commit
   shows the new files and hides the replaced ones in one step (RunIndex.replaced); the replaced files
   are deleted after it (or by the next run or compaction, if this one dies in between).
Rows of hidden runs (superseded by an --overwrite run) in those files are dropped from disk; readers
skipped them already. pyarrow only: no torch, no Ray.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow.compute as pc
import pyarrow.parquet as pq

from camjobs.config import DEFAULT_LOCK_LEASE
from camjobs.lock import output_lock
from camjobs.output import COMPACTION, TABLES, NoResults, OutputDir, RunIndex, publish_run, run_index
from camjobs.parquet_files import DEFAULT_TARGET, FileTarget, rewrite, scan

log = logging.getLogger(__name__)


@dataclass
class TablePlan:
    """One table's files before a compaction, and those it rewrites."""

    files: int = 0  # live files
    rows: int = 0  # live rows
    rewrite: list[str] = field(default_factory=list)  # files to rewrite
    rewrite_rows: int = 0  # their live rows
    dropped: int = 0  # their rows of hidden runs

    @property
    def needed(self) -> bool:
        return len(self.rewrite) > 1 or self.dropped > 0


@dataclass
class CompactResult:
    """What a compaction did; compaction_id None when there was nothing to do."""

    compaction_id: str | None
    counts: dict[str, dict[str, int]]  # table -> files_before, files_after, rows, rows_rewritten, rows_dropped
    summary_path: str | None = None


def new_compaction_id() -> str:
    """Like a run id (UTC start time first), marked as a compaction's."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-compact-" + uuid.uuid4().hex[:6]


def _hidden_rows(out: OutputDir, path: str, index: RunIndex) -> int:
    """Rows of hidden runs in a file (only a compaction's files mix runs)."""
    if not index.hidden or path[len(out.root) + 1 :].split("/")[1] not in index.compactions:
        return 0
    with out.fs.open_input_file(path) as handle:
        run_ids = pq.read_table(handle, columns=["run_id"])["run_id"]
    return pc.sum(pc.is_in(run_ids, value_set=pc.cast(sorted(index.hidden), run_ids.type))).as_py() or 0


def plan_compaction(out: OutputDir, index: RunIndex, target: FileTarget) -> dict[str, TablePlan]:
    """The files each table has and those a compaction rewrites (the module's step 1)."""
    plans = {}
    for name in TABLES:
        plan = plans[name] = TablePlan()
        sizes = {i.path: i.size for i in out.fs.get_file_info(out.parquet_files(out.table(name)))}
        for path in sorted(p for p in sizes if index.is_live(out, name, p)):
            rows, hidden = out.num_rows(path), _hidden_rows(out, path, index)
            plan.files += 1
            plan.rows += rows - hidden
            if hidden or target.is_small(rows, sizes[path]):
                plan.rewrite.append(path)
                plan.rewrite_rows += rows - hidden
                plan.dropped += hidden
    return plans


def compact(
    output: str,
    *,
    target: FileTarget = DEFAULT_TARGET,
    lease_s: float = DEFAULT_LOCK_LEASE,
    on_step: Callable[[str], None] | None = None,
    progress: bool = False,
) -> CompactResult:
    """Compact OUTPUT's cams/ and errors/ (the module's protocol). `on_step` hears each step by name:
    "planned", "staged", then publish_run's "publishing" and "committed"."""
    out = OutputDir.open(output)
    if not any(out.is_dir(out.table(name)) for name in TABLES):
        raise NoResults(f"no results in {output}: neither cams/ nor errors/ exists there (run `camjobs run` first)")
    step = on_step or (lambda _: None)
    compaction_id, started = new_compaction_id(), time.time()
    with output_lock(output, compaction_id, lease_s) as lease:
        index = run_index(output)  # after the lock removed what unfinished runs left
        plans = {name: plan for name, plan in plan_compaction(out, index, target).items()}
        counts = {name: {"files_before": plan.files, "rows": plan.rows} for name, plan in plans.items()}
        step("planned")
        if not any(plan.needed for plan in plans.values()):
            log.info("%s is compact already: nothing to do", output)
            for count in counts.values():
                count.update(files_after=count["files_before"], rows_rewritten=0, rows_dropped=0)
            return CompactResult(None, counts)
        replaces = _stage(out, compaction_id, index, plans, target, counts, progress)
        step("staged")
        lease.check()
        summary = {
            "kind": COMPACTION,
            "compaction_id": compaction_id,
            "replaces": replaces,
            "counts": counts,
            "target": {"rows": target.rows, "bytes": target.bytes},
            "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
            "duration_s": round(time.time() - started, 3),
        }
        path = publish_run(output, compaction_id, summary, on_step=on_step)
    return CompactResult(compaction_id, counts, path)


def _stage(
    out: OutputDir,
    compaction_id: str,
    index: RunIndex,
    plans: dict[str, TablePlan],
    target: FileTarget,
    counts: dict[str, dict[str, int]],
    progress: bool,
) -> dict[str, list[str]]:
    """Stream the rows of the files to rewrite into the compaction's staging (step 2); the files it replaces,
    per table, relative to the table's folder. Fails before publishing if a row went missing."""
    from tqdm import tqdm

    total = sum(plan.rewrite_rows for plan in plans.values() if plan.needed)
    live = pc.invert(pc.field("run_id").isin(sorted(index.hidden))) if index.hidden else None
    replaces = {}
    with tqdm(total=total, desc="compact", unit="row", disable=not progress) as bar:
        for name, plan in plans.items():
            if not plan.needed:
                counts[name].update(files_after=plan.files, rows_rewritten=0, rows_dropped=0)
                continue
            staged = f"{out.staging(compaction_id)}/{name}"
            batches = scan(out.fs, plan.rewrite, TABLES[name], live)
            written = rewrite(out.fs, batches, TABLES[name], staged, target, on_rows=bar.update)
            if sum(rows for _, rows in written) != plan.rewrite_rows:
                raise RuntimeError(
                    f"lost rows: {plan.rewrite_rows} live rows in the {name} files to rewrite, but "
                    f"{sum(rows for _, rows in written)} written; nothing was published"
                )
            counts[name].update(
                files_after=plan.files - len(plan.rewrite) + len(written),
                rows_rewritten=plan.rewrite_rows,
                rows_dropped=plan.dropped,
            )
            replaces[name] = [path[len(out.table(name)) + 1 :] for path in plan.rewrite]
    return replaces
