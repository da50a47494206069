"""camjobs export --format yolo: a detection dataset in Ultralytics' layout, which
``yolo detect train data=TO/data.yaml`` loads as it is.

TO/data.yaml
    ``path``: TO, absolute; ``train: images/train``; ``val: images/val`` (``images/train`` where
    there is no val split, below); ``names``: class id -> name (``--categories``).
TO/images/<split>/<image_id><suffix of the source file>
    Each image with at least one box. A nested image_id keeps its folders, so sub/dir/ISIC_1 and
    other/ISIC_1 do not collide, and the file keeps its own stem. ``--images link`` (default) makes
    a symlink to the file the run read: no second copy of a dataset of gigabytes, and data.yaml's
    absolute ``path`` ties the export to this machine anyway. ``--images copy`` copies it: a
    folder to move or upload, and the only way for sources that are URIs (s3://, gs://).
TO/labels/<split>/<image_id>.txt
    Where Ultralytics looks for an image's labels (``img2label_paths``: the last ``/images/`` of
    the image's path becomes ``/labels/``, its suffix ``.txt``): one ``class cx cy w h`` line per
    box, normalized to [0, 1].
TO/manifest.csv
    image (its path below TO), split, image_id, file_name (below the run's --data), width,
    height, boxes.

Images without boxes (all below --min-score, or --boxes refined on an image without refinement)
are left out: to YOLO an image without labels is a background image, one with no lesion.

The split: an image is in val when the first 64 bits of the SHA-256 of its image_id, as a
fraction of 2**64, are below ``--val-fraction`` (default 0.1). An image stays on its side in every
export, whatever else is exported or added later, and val is held out because Ultralytics keeps
the epoch that does best on it. The output has no lesion ids, so two images of one lesion may fall
on both sides. With ``--val-fraction 0``, or where a side would be empty (a handful of images),
every image is in train and val is train.

Into TO: a new or empty folder, or an earlier YOLO export of camjobs (its data.yaml starts with
MARKER), whose images/, labels/, data.yaml and manifest.csv are replaced; anything else is refused.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow.fs as pafs
import yaml

from camjobs.geometry import xyxy_to_cxcywh
from camjobs.labels.export import ExportError, ExportImage, ExportPlan, _write_text, stable_hash
from camjobs.storage import open_filesystem

log = logging.getLogger(__name__)

MARKER = "# camjobs export --format yolo"
DATA_YAML = "data.yaml"
MANIFEST = "manifest.csv"
# The suffixes of the images camjobs reads that Ultralytics reads too (its IMG_FORMATS, any case)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class YoloImage:
    image: ExportImage
    split: str  # "train" or "val"
    image_path: str  # below TO: images/<split>/<image_id><suffix>
    label_path: str  # below TO: labels/<split>/<image_id>.txt


def label_path(image_path: str) -> str:
    """Where Ultralytics looks for the labels of the image at `image_path` (below the dataset root):
    ultralytics.data.utils.img2label_paths, the last /images/ replaced by /labels/, the suffix by .txt."""
    head, _, tail = ("/" + image_path).rpartition("/images/")
    return (head + "/labels/" + tail).rsplit(".", 1)[0][1:] + ".txt"


def in_val(image_id: str, val_fraction: float) -> bool:
    return stable_hash(image_id) / 2**64 < val_fraction


def yolo_lines(image: ExportImage, categories: Sequence[str]) -> list[str]:
    index = {name: i for i, name in enumerate(categories)}
    lines = []
    for box in image.boxes:
        cx, cy, w, h = xyxy_to_cxcywh(box.xyxy)
        cx, cy, w, h = cx / image.width, cy / image.height, w / image.width, h / image.height
        lines.append(f"{index[box.category]} {cx:.8f} {cy:.8f} {w:.8f} {h:.8f}")
    return lines


def _relative_id(image_id: str) -> str:
    """The image_id as a relative path ("\\" taken for "/"); ExportError where it is none."""
    parts = image_id.replace("\\", "/").split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ExportError(f"image id {image_id!r} is not a relative path: it cannot name a file of a YOLO dataset")
    return "/".join(parts)


def _suffix(source_path: str) -> str:
    suffix = posixpath.splitext(posixpath.basename(source_path.replace("\\", "/")))[1]
    if suffix.lower() not in IMAGE_SUFFIXES:
        raise ExportError(f"{source_path}: Ultralytics reads only {', '.join(IMAGE_SUFFIXES)} images")
    return suffix


def place_images(plan: ExportPlan, val_fraction: float) -> tuple[list[YoloImage], bool]:
    """The images with boxes, each in its split at its paths, and whether val is train."""
    boxed = [image for image in plan.images if image.boxes]
    val = {image.image_id for image in boxed if in_val(image.image_id, val_fraction)}
    val_is_train = not 0 < len(val) < len(boxed)
    if val_is_train:
        if val_fraction > 0 and boxed:
            log.warning("--val-fraction %s leaves one side empty on %d images: val is train", val_fraction, len(boxed))
        val = set()
    placed, owners = [], {}
    for image in boxed:
        split = "val" if image.image_id in val else "train"
        image_path = f"images/{split}/{_relative_id(image.image_id)}{_suffix(image.source_path)}"
        entry = YoloImage(image, split, image_path, label_path(image_path))
        for path in (entry.image_path, entry.label_path):
            if path in owners:
                raise ExportError(f"image ids {owners[path]!r} and {image.image_id!r} map to the same file {path}")
            owners[path] = image.image_id
        placed.append(entry)
    return placed, val_is_train


# --------------------------------------------------------------------------- the folder
def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _local(path: str) -> str:
    return os.path.abspath(path[len("file://") :] if path.startswith("file://") else path)


def _check_links(to: str, placed: Sequence[YoloImage]) -> None:
    """--images link needs a local TO and local source files that exist; say so before writing."""
    if not _is_local(to):
        raise ExportError(f"--to {to} is not a local folder: symlinks need one; use --images copy")
    remote = [entry.image.source_path for entry in placed if not _is_local(entry.image.source_path)]
    if remote:
        raise ExportError(f"{len(remote)} images are URIs (e.g. {remote[0]}): use --images copy")
    missing = [entry.image.source_path for entry in placed if not os.path.isfile(_local(entry.image.source_path))]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} source images are not where the run read them (e.g. {missing[0]}): --images link "
            "links to them"
        )


def _prepare(fs: pafs.FileSystem, root: str, to: str) -> None:
    """Make TO ready: create it, or clear an earlier YOLO export of camjobs in it; refuse anything else."""
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        fs.create_dir(root, recursive=True)
        return
    if info.type != pafs.FileType.Directory:
        raise ExportError(f"--to {to} is a file: a YOLO export is a folder")
    names = {posixpath.basename(entry.path) for entry in fs.get_file_info(pafs.FileSelector(root))}
    if not names:
        return
    if DATA_YAML not in names or not _written_by_camjobs(fs, f"{root}/{DATA_YAML}"):
        raise ExportError(f"--to {to} is not empty and holds no YOLO export of camjobs: give a new or empty folder")
    for name in ("images", "labels"):  # the links inside go, never what they point to
        if name in names:
            fs.delete_dir(f"{root}/{name}")
    for name in (DATA_YAML, MANIFEST):
        if name in names:
            fs.delete_file(f"{root}/{name}")


def _written_by_camjobs(fs: pafs.FileSystem, path: str) -> bool:
    with fs.open_input_stream(path) as stream:
        return stream.read(len(MARKER)).decode("utf-8", "replace") == MARKER


def _place_image(fs: pafs.FileSystem, root: str, entry: YoloImage, images: str) -> None:
    target = f"{root}/{entry.image_path}"
    fs.create_dir(posixpath.dirname(target), recursive=True)
    if images == "link":
        os.symlink(_local(entry.image.source_path), _local(target))
        return
    source_fs, source = open_filesystem(entry.image.source_path)
    pafs.copy_files(source, target, source_filesystem=source_fs, destination_filesystem=fs)


def data_yaml(root: str, categories: Sequence[str], val_is_train: bool) -> str:
    data = {
        "path": root,
        "train": "images/train",
        "val": "images/train" if val_is_train else "images/val",
        "names": dict(enumerate(categories)),
    }
    return f"{MARKER}\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _manifest(placed: Sequence[YoloImage]) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["image", "split", "image_id", "file_name", "width", "height", "boxes"])
    for entry in placed:
        image = entry.image
        row = [entry.image_path, entry.split, image.image_id, image.file_name, image.width, image.height]
        writer.writerow([*row, len(image.boxes)])
    return text.getvalue()


def write_yolo(plan: ExportPlan, to: str, *, images: str, val_fraction: float) -> tuple[list[str], str]:
    """Write the dataset to the folder `to`: (the files written: data.yaml, manifest.csv, the label
    files; a line on the split for the summary)."""
    placed, val_is_train = place_images(plan, val_fraction)
    if images == "link":
        _check_links(to, placed)
    fs, root = open_filesystem(to.rstrip("/"))
    _prepare(fs, root, to)
    shown = to.rstrip("/")
    absolute = _local(root) if _is_local(to) else shown
    # data.yaml first: a run stopped half-way leaves a folder the next export recognises and replaces
    _write_text(fs, f"{root}/{DATA_YAML}", data_yaml(absolute, plan.categories, val_is_train))
    for split in ("train",) if val_is_train else ("train", "val"):  # what data.yaml names exists, even empty
        fs.create_dir(f"{root}/images/{split}", recursive=True)
    for entry in placed:
        _place_image(fs, root, entry, images)
        _write_text(fs, f"{root}/{entry.label_path}", "\n".join(yolo_lines(entry.image, plan.categories)) + "\n")
    _write_text(fs, f"{root}/{MANIFEST}", _manifest(placed))
    if not placed:
        log.warning("no image has a box: the YOLO dataset is empty")
    val = sum(entry.split == "val" for entry in placed)
    left_out = len(plan.images) - len(placed)
    detail = f"train {len(placed) - val}, val {'= train' if val_is_train else val}" + (
        f", {left_out} without a box left out" if left_out else ""
    )
    paths = [f"{shown}/{DATA_YAML}", f"{shown}/{MANIFEST}", *(f"{shown}/{entry.label_path}" for entry in placed)]
    return paths, detail
