"""A dataset root on any pyarrow file system: how to name its files, list its folders and walk its files.

Local roots also answer which files escape the root through symlinks (camjobs.layouts refuses
those unless told to follow them). Plain pyarrow; no camjobs imports, so every tool may use it.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, replace

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


def walk_files(root: DatasetRoot) -> Iterator[str]:
    """Paths of all visible files below root.path, each real file once."""
    if root.real_root is None:  # remote: one recursive listing is far cheaper than one per folder
        prefix = len(root.path.rstrip("/")) + 1
        for info in sorted(root.fs.get_file_info(pafs.FileSelector(root.path, recursive=True)), key=lambda i: i.path):
            if info.type == pafs.FileType.File and all(map(visible, info.path[prefix:].split("/"))):
                yield info.path
        return
    # Local: walk folder by folder, so a symlinked folder (an alias or a loop back up the tree,
    # which pyarrow would follow ~40 levels deep) is entered at most once per real folder.
    # Symlinked folders are visited last, so files are named by their real path when possible.
    pending, linked, seen = [root.path], [], set()
    while pending or linked:
        folder = pending.pop() if pending else linked.pop(0)
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        subfolders = []
        for info in root.listdir(folder):
            if not visible(info.base_name):
                continue
            if info.type == pafs.FileType.File:
                yield info.path
            elif info.type == pafs.FileType.Directory:
                (linked if os.path.islink(info.path) else subfolders).append(info.path)
        pending.extend(reversed(subfolders))
