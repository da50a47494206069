"""Parquet rows rewritten, streamed, into few large files: a run's staged parts and `camjobs compact`.

A file ends at FileTarget.rows rows or once it holds FileTarget.bytes bytes, whichever comes first,
and is written in row groups of about ROW_GROUP_BYTES, so that memory holds one row group, never a
file. pyarrow only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

ROW_GROUP_BYTES = 64 * 2**20  # large enough for fast scans, small enough to buffer while writing
READ_BATCH_ROWS = 1024  # rows a scan hands over at a time: a few MB even with full-size heatmaps


@dataclass(frozen=True)
class FileTarget:
    """When a rewritten file is full: at `rows` rows or `bytes` bytes of Parquet."""

    rows: int = 1_000_000
    bytes: int = 512 * 2**20

    def __post_init__(self) -> None:
        if self.rows < 1 or self.bytes < 1:
            raise ValueError(f"a file target needs rows >= 1 and bytes >= 1, got {self.rows} and {self.bytes}")

    def is_small(self, rows: int, size: int) -> bool:
        """A file under half the target either way: worth merging with others."""
        return rows < self.rows // 2 and size < self.bytes // 2


DEFAULT_TARGET = FileTarget()


def scan(
    fs: pafs.FileSystem, files: list[str], schema: pa.Schema, row_filter: pads.Expression | None = None
) -> Iterable[pa.RecordBatch]:
    """The rows of `files` as batches of `schema`, one file at a time, with few batches read ahead."""
    dataset = pads.dataset(files, schema=schema, filesystem=fs, format="parquet", exclude_invalid_files=False)
    return dataset.to_batches(
        filter=row_filter, batch_size=READ_BATCH_ROWS, batch_readahead=2, fragment_readahead=1, use_threads=False
    )


@dataclass
class _OpenFile:
    path: str
    stream: pa.NativeFile
    writer: pq.ParquetWriter
    rows: int = 0


def rewrite(
    fs: pafs.FileSystem,
    batches: Iterable[pa.RecordBatch],
    schema: pa.Schema,
    folder: str,
    target: FileTarget = DEFAULT_TARGET,
    on_rows: Callable[[int], None] | None = None,
) -> list[tuple[str, int]]:
    """Write `batches` into folder/part-00000.parquet, part-00001.parquet, ... filled up to `target`;
    at least one file (empty if need be), so that the folder reads with the full schema. Returns
    each file's path and rows; `on_rows` hears of each row group written (a progress bar)."""
    fs.create_dir(folder, recursive=True)
    written: list[tuple[str, int]] = []
    current: _OpenFile | None = None
    pending: list[pa.RecordBatch] = []

    def flush() -> None:
        nonlocal current
        rows = sum(batch.num_rows for batch in pending)
        if current is None:
            path = f"{folder}/part-{len(written):05d}.parquet"
            stream = fs.open_output_stream(path)
            current = _OpenFile(path, stream, pq.ParquetWriter(stream, schema))
        if rows:
            current.writer.write_table(pa.Table.from_batches(pending, schema), row_group_size=rows)
        current.rows += rows
        pending.clear()
        if on_rows:
            on_rows(rows)
        if current.rows >= target.rows or current.stream.tell() >= target.bytes:
            close()

    def close() -> None:
        nonlocal current
        if current is not None:
            current.writer.close()
            current.stream.close()
            written.append((current.path, current.rows))
            current = None

    try:
        for batch in batches:
            while batch.num_rows:
                filled = (current.rows if current else 0) + sum(b.num_rows for b in pending)
                pending.append(batch.slice(0, target.rows - filled))
                batch = batch.slice(target.rows - filled)
                buffered = sum(b.nbytes for b in pending)
                if filled + pending[-1].num_rows >= target.rows or buffered >= min(ROW_GROUP_BYTES, target.bytes):
                    flush()
        if pending or (current is None and not written):
            flush()
        close()
    except BaseException:
        if current is not None:
            current.stream.close()
        raise
    return written
