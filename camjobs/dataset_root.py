"""A dataset root on any pyarrow file system: how to name its files, list its folders and walk its files.

Local roots also answer which files escape the root through symlinks (camjobs.layouts refuses
those unless told to follow them). Plain pyarrow; no camjobs imports, so every tool may use it.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.fs as pafs


@dataclass(frozen=True)
class DatasetRoot:
    """An opened dataset root: the file system, the root path in it, and how to name files."""

    fs: pafs.FileSystem
    path: str  # the dataset root inside fs (where the layout's names live)
    scheme: str | None  # None for the local file system
    real_root: str | None  # local only: realpath of the root as given, for the symlink check
    follow_symlinks: bool

    def at(self, path: str) -> DatasetRoot:
        return replace(self, path=path)

    def join(self, *names: str) -> str:
        return posixpath.join(self.path, *names)

    def uri(self, path: str) -> str:
        return path if self.scheme is None else f"{self.scheme}://{path}"

    def escapes(self, path: str) -> bool:
        """True if a local file resolves (through symlinks) to outside the dataset root."""
        if self.real_root is None or self.follow_symlinks:
            return False
        return os.path.commonpath([os.path.realpath(path), self.real_root]) != self.real_root

    def listdir(self, path: str) -> list[pafs.FileInfo]:
        infos = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return sorted(infos, key=lambda info: info.path)

    def exists(self, path: str, kind: pafs.FileType) -> bool:
        return self.fs.get_file_info(path).type == kind


def visible(name: str) -> bool:
    # Hidden files, macOS "._x.jpg"/__MACOSX debris and camjobs' own "_staging" are never inputs.
    return not name.startswith((".", "_"))


# The files a walk yields, a batch at a time: their paths, sizes and modification times as the listing
# got them (no second stat), and whether a local one escapes the root through a symlink.
FILES_SCHEMA = pa.schema(
    [("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("escapes", pa.bool_())]
)
BATCH_ROWS = 8192
LIST_THREADS = 16  # concurrent listings of an object store's sub-prefixes


class _Batches:
    """Rows gathered into FILES_SCHEMA record batches of BATCH_ROWS."""

    def __init__(self) -> None:
        self.columns: tuple[list, ...] = ([], [], [], [])

    def add(self, path: str, size: int | None, mtime_ns: int | None, escapes: bool = False) -> pa.RecordBatch | None:
        for column, value in zip(self.columns, (path, size, mtime_ns, escapes)):
            column.append(value)
        return self.flush() if len(self.columns[0]) >= BATCH_ROWS else None

    def add_entry(self, root: DatasetRoot, entry: os.DirEntry, folder_escapes: bool) -> pa.RecordBatch | None:
        """A local file from os.scandir, with the stat scandir already made."""
        stat = entry.stat()
        # Only a symlink or a folder outside can lead out of the root: realpath per file is costly.
        escapes = folder_escapes or (entry.is_symlink() and root.escapes(entry.path))
        return self.add(entry.path, stat.st_size, stat.st_mtime_ns, escapes)

    def flush(self) -> pa.RecordBatch | None:
        if not self.columns[0]:
            return None
        batch = pa.RecordBatch.from_arrays(
            [pa.array(c, f.type) for c, f in zip(self.columns, FILES_SCHEMA)], schema=FILES_SCHEMA
        )
        self.columns = ([], [], [], [])
        return batch


def file_infos_batch(infos: list[pafs.FileInfo], prefix: int) -> pa.RecordBatch | None:
    """The visible files among infos (paths relative from `prefix` on) as one FILES_SCHEMA batch."""
    batches = _Batches()
    for info in infos:
        if info.type == pafs.FileType.File and all(map(visible, info.path[prefix:].split("/"))):
            batches.columns[0].append(info.path)
            batches.columns[1].append(info.size)
            batches.columns[2].append(info.mtime_ns)
            batches.columns[3].append(False)
    return batches.flush()


def walk_files(root: DatasetRoot) -> Iterator[pa.RecordBatch]:
    """All visible files below root.path, each real file once, as FILES_SCHEMA record batches (in no
    particular order): the driver never holds one Python object per file of the whole dataset."""
    if root.real_root is None:
        yield from _walk_remote(root)
    else:
        yield from _walk_local(root)


def _walk_remote(root: DatasetRoot) -> Iterator[pa.RecordBatch]:
    """One recursive listing per top-level folder (far cheaper than one per folder), run in parallel."""
    prefix = len(root.path.rstrip("/")) + 1
    top = root.fs.get_file_info(pafs.FileSelector(root.path, allow_not_found=True))
    first = file_infos_batch(top, prefix)
    if first is not None:
        yield first
    folders = [i.path for i in top if i.type == pafs.FileType.Directory and visible(i.base_name)]

    def list_folder(folder: str) -> pa.RecordBatch | None:
        return file_infos_batch(root.fs.get_file_info(pafs.FileSelector(folder, recursive=True)), prefix)

    with ThreadPoolExecutor(max_workers=min(LIST_THREADS, max(1, len(folders)))) as pool:
        for batch in pool.map(list_folder, folders):
            if batch is not None:
                yield batch


def _walk_local(root: DatasetRoot) -> Iterator[pa.RecordBatch]:
    """Folder by folder with os.scandir (a stream, not a list per folder), so that a symlinked folder (an
    alias or a loop back up the tree, which pyarrow would follow ~40 levels deep) is entered at most once
    per real folder. Symlinked folders are visited last, so files are named by their real path when possible."""
    pending, linked, seen = [root.path], [], set()
    batches = _Batches()
    while pending or linked:
        folder = pending.pop() if pending else linked.pop(0)
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        folder_escapes = root.escapes(folder)
        subfolders = []
        with os.scandir(folder) as entries:
            for entry in entries:
                if not visible(entry.name):
                    continue
                if entry.is_file():
                    batch = batches.add_entry(root, entry, folder_escapes)
                    if batch is not None:
                        yield batch
                elif entry.is_dir():
                    (linked if entry.is_symlink() else subfolders).append(entry.path)
        pending.extend(sorted(subfolders, reverse=True))
    batch = batches.flush()
    if batch is not None:
        yield batch


def folder_files(root: DatasetRoot, folder: str) -> Iterator[pa.RecordBatch]:
    """The files directly in `folder` (hidden ones too: the caller decides), as FILES_SCHEMA record batches:
    a flat folder of a million images is never a million Python objects at once when local."""
    batches = _Batches()
    if root.real_root is None:
        for info in root.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
            if info.type == pafs.FileType.File:
                batch = batches.add(info.path, info.size, info.mtime_ns)
                if batch is not None:
                    yield batch
    elif os.path.isdir(folder):
        folder_escapes = root.escapes(folder)
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file():
                    batch = batches.add_entry(root, entry, folder_escapes)
                    if batch is not None:
                        yield batch
    batch = batches.flush()
    if batch is not None:
        yield batch


def folder_names(root: DatasetRoot, path: str) -> Iterator[tuple[str, pafs.FileType]]:
    """(name, type) of each entry of a folder, streamed where local; none where there is no such folder."""
    if root.real_root is None:
        yield from ((info.base_name, info.type) for info in root.listdir(path))
    elif os.path.isdir(path):
        with os.scandir(path) as entries:
            for entry in entries:
                kind = pafs.FileType.File if entry.is_file() else pafs.FileType.Unknown
                yield entry.name, pafs.FileType.Directory if entry.is_dir() else kind
