"""A command's inputs checked before it creates or starts anything: the mistakes of a first run.

`camjobs run` calls check_run before it takes the output's lock (which creates the folder) and
before Ray starts, so that a missing dataset, a missing or unreadable checkpoint or an output
that is a file exits 2 with the flag to fix, and leaves nothing behind. The checks only look at
names and a file's first bytes: the files are read for real where they are used (camjobs.layouts
lists a dataset, camjobs.models.networks loads a checkpoint). Plain Python and pyarrow, no torch
and no Ray.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

import pyarrow.fs as pafs

from camjobs.config import Layout, RunConfig
from camjobs.errors import UsageError
from camjobs.layouts import check_label_column, detect_layout
from camjobs.storage import open_filesystem

PICKLE_PROTOCOL_2_PLUS = b"\x80"  # what a pickle (torch.save's format before torch 1.6) starts with
ZIP_START = b"PK\x03\x04"


class PreflightError(UsageError, ValueError):
    """An input a command was given that cannot work; the message names the flag."""


def check_run(cfg: RunConfig) -> None:
    """Everything `camjobs run` can check before it creates the output folder or starts Ray."""
    check_data(cfg.data, auto_layout=cfg.layout == Layout.AUTO)
    if cfg.label_column is not None:
        check_label_column(cfg.data, str(cfg.layout), cfg.label_column)
    if cfg.checkpoint:
        check_model_file(cfg.checkpoint, "--checkpoint")
    if cfg.weights and cfg.weights.lower() != "imagenet":
        check_model_file(cfg.weights, "--weights")
    check_output(cfg.output)


def check_train(data: str, out: str, layout: str, weights: str | None, weights_flag: str) -> None:
    """What `camjobs train` can check before it lists and decodes the dataset (its labels are checked there)."""
    check_data(data, auto_layout=layout == Layout.AUTO)
    if weights and weights.lower() != "imagenet":
        check_model_file(weights, weights_flag)
    if os.path.isdir(out):
        raise PreflightError(f"--out {out} is a folder; give the checkpoint file to write (e.g. {out}/model.pt)")


def check_data(data: str, flag: str = "--data", *, auto_layout: bool = True) -> None:
    """The dataset folder exists; on a local disk, with auto layout, it is in a layout camjobs knows.

    Remote URIs are left to the listing: detecting a plain folder's layout there lists the whole prefix."""
    fs, path = open_filesystem(data)
    local = isinstance(fs, pafs.LocalFileSystem)
    kind = fs.get_file_info(os.path.abspath(os.path.expanduser(path)) if local else path.rstrip("/")).type
    if kind == pafs.FileType.NotFound:
        raise PreflightError(f"{flag} {data}: no such folder")
    if kind != pafs.FileType.Directory:
        raise PreflightError(f"{flag} {data} is a file; give the dataset's folder")
    if local and auto_layout:
        detect_layout(data)  # a LayoutError (exit 2) names what it looked for


def check_output(output: str, flag: str = "--output") -> None:
    """On a local disk: the output is a folder, or can be made one (object stores have no folders)."""
    fs, path = open_filesystem(output)
    if not isinstance(fs, pafs.LocalFileSystem):
        return
    path = os.path.abspath(os.path.expanduser(path))
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "is a file" if existing == path else f"lies below {existing}, which is a file"
        raise PreflightError(f"{flag} {output} {what}; give a folder (it is created if it does not exist)")
    # An output that cannot be written (read-only storage, a full disk) is a storage error of the run: exit 1.


def check_model_file(path: str, flag: str) -> None:
    """A checkpoint or weights file exists, can be read, and is in a format torch.load or safetensors reads."""
    if "://" in path:
        raise PreflightError(f"{flag} {path}: must be a local file (copy it to every node, see the README)")
    file = Path(path).expanduser()
    if not file.exists():
        raise PreflightError(f"{flag} {path}: no such file")
    if file.is_dir():
        raise PreflightError(f"{flag} {path} is a folder; give the file (camjobs train --out writes one)")
    try:
        with file.open("rb") as stream:
            head = stream.read(64)
    except OSError as error:
        raise PreflightError(f"{flag} {path} cannot be read: {error.strerror or error}") from None
    problem = _safetensors_problem(file, head) if file.suffix == ".safetensors" else _torch_file_problem(file, head)
    if problem:
        raise PreflightError(f"{flag} {path} {problem}")


def _torch_file_problem(file: Path, head: bytes) -> str | None:
    """Why a file is not one torch.save wrote (a zip archive with data.pkl, or an older pickle); None if it is."""
    if head.startswith(PICKLE_PROTOCOL_2_PLUS):
        return None
    if zipfile.is_zipfile(file):
        with zipfile.ZipFile(file) as archive:
            if any(name == "data.pkl" or name.endswith("/data.pkl") for name in archive.namelist()):
                return None
        return "is a zip archive but not one torch.save wrote (it has no data.pkl)"
    if head.startswith(ZIP_START):
        return "is a damaged or truncated checkpoint (a zip archive without its end: an interrupted copy?)"
    return f"is not a checkpoint torch.save wrote: {_describe(head)}"


def _safetensors_problem(file: Path, head: bytes) -> str | None:
    """safetensors: an 8-byte little-endian header length, then that many bytes of JSON."""
    if len(head) >= 9 and head[8:9] == b"{":
        (length,) = struct.unpack("<Q", head[:8])
        if 8 + length <= file.stat().st_size:
            try:
                with file.open("rb") as stream:
                    stream.seek(8)
                    json.loads(stream.read(length))
                return None
            except ValueError:
                pass
    return f"is not a safetensors file: {_describe(head)}"


def _describe(head: bytes) -> str:
    """What a file's first bytes look like, in words."""
    if not head:
        return "it is empty"
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the file itself (run `git lfs pull`)"
    text = head.split(b"\n", 1)[0]
    if all(32 <= byte < 127 or byte == 9 for byte in text):
        return f"it is a text file ({text.decode()[:40]!r}...)"
    return "it is some other binary file"
