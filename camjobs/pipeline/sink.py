"""The Parquet Datasink: result rows into cams and errors, written to the run's staging folder.

The commit protocol around it (staging, publishing, the lock) is camjobs.output's. Ray calls
the sink's lifecycle on the driver: ``write`` in each write task, then ``on_write_complete``
with every task's counts, which merges the run's parts into few large files
(output.merge_staged), or ``on_write_failed`` when a task or the pipeline before it failed,
which drops what the run had staged (a failed run leaves nothing to clean up).
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink

from camjobs.output import FINGERPRINTS, TABLES, drop_staging, merge_staged, staging_dir
from camjobs.schema import FINGERPRINT_INTS, FINGERPRINTS_SCHEMA, NO_INT
from camjobs.storage import open_filesystem

log = logging.getLogger(__name__)


@dataclass
class SinkStats:
    processed: int = 0
    errors: int = 0
    skipped: int = 0  # hashed and found unchanged (an incremental run)
    refine_failed: int = 0  # cams rows whose refinement failed (their CAM columns are intact)
    rows_per_node: Counter = field(default_factory=Counter)
    error_types: Counter = field(default_factory=Counter)

    def add(self, other: SinkStats) -> None:
        self.processed += other.processed
        self.errors += other.errors
        self.skipped += other.skipped
        self.refine_failed += other.refine_failed
        self.rows_per_node.update(other.rows_per_node)
        self.error_types.update(other.error_types)


def _fingerprint_nulls(table: pa.Table) -> pa.Table:
    """The fingerprint's integer columns with schema.NO_INT (the pipeline's "none") as nulls again."""
    for name in FINGERPRINT_INTS:
        column = table[name]
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, pc.if_else(pc.equal(column, NO_INT), pa.scalar(None, pa.int64()), column))
    return table


class CamParquetSink(Datasink[SinkStats]):
    """Splits result rows into cams and errors and writes both to the staging folder."""

    def __init__(self, output: str, run_id: str):
        self.output, self.run_id = output, run_id
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
                table = _fingerprint_nulls(table)
                skipped = table["skipped"].fill_null(False)
                stats.skipped += pc.sum(skipped.cast(pa.int64())).as_py() or 0
                touched = table.filter(skipped)  # their new fingerprint, so that the next run skips them unopened
                table = table.filter(pc.invert(skipped))
                failed = pc.is_valid(table["error_type"])
                parts = {"cams": table.filter(pc.invert(failed)), "errors": table.filter(failed), FINGERPRINTS: touched}
                for name, rows in parts.items():
                    if rows.num_rows == 0:
                        continue
                    schema = TABLES.get(name, FINGERPRINTS_SCHEMA)
                    if name not in writers:
                        fs.create_dir(f"{base}/{name}", recursive=True)
                        writers[name] = pq.ParquetWriter(f"{base}/{name}/{part}", schema, filesystem=fs)
                    writers[name].write_table(rows.select(schema.names).cast(schema))
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
        stats = SinkStats()
        for task_stats in write_result.write_returns:
            stats.add(task_stats)
        # Merged here rather than by bundling the writes (Datasink.min_rows_per_write): the write is fused
        # with localize, whose tasks must stay one model batch each to keep the cores busy.
        rows = merge_staged(self.output, self.run_id)
        if (rows["cams"], rows["errors"]) != (stats.processed, stats.errors):
            raise RuntimeError(
                f"lost rows: the write tasks wrote {stats.processed} cams and {stats.errors} errors rows, "
                f"but run {self.run_id}'s staging holds {rows['cams']} and {rows['errors']}"
            )
        self.stats = stats

    def on_write_failed(self, error: Exception) -> None:
        # Best effort, as Ray calls it: the write's own error is what the run reports, so a
        # failure to clean up (a read-only or full disk) is only logged; the next run's lock
        # removes what is left.
        try:
            drop_staging(self.output, self.run_id)
        except OSError as exc:
            log.warning("could not remove %s after a failed write: %s", self.staging, exc)
