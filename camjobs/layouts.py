"""List the images of a dermoscopy dataset laid out like one of the public downloads.

This is the first stage of the pipeline: it only looks at names and CSVs (never decodes an
image) and must stay importable without ray or torch. All file-system access goes through
``pyarrow.fs`` so that a dataset root may be a local path or a URI such as ``s3://bucket/isic``.

Layouts (``LAYOUTS``) and the names that identify them at the dataset root:

- ``ham10000``  HAM10000_images_part_1/, HAM10000_images_part_2/ (or ..._part1/, ..._part2/),
  HAM10000_metadata.csv (label = ``dx``), masks HAM10000_segmentations_lesion_tschandl/.
- ``isic2017``  ISIC-2017_{Training,Validation,Test_v2}_Data/ with
  ISIC-2017_<split>_Part3_GroundTruth.csv (melanoma / seborrheic_keratosis / nevus) and masks in
  ISIC-2017_<split>_Part1_GroundTruth/. ``*_superpixels.png`` files are not inputs.
- ``isic2018``  ISIC2018_Task3_<split>_Input/ with ISIC2018_Task3_<split>_GroundTruth.csv at the
  root or inside the folder of the same name (one-hot, label = column name), Task 1 masks in
  ISIC2018_Task1_<split>_GroundTruth/.
- ``isic2019``  ISIC_2019_Training_Input/ + ISIC_2019_Training_GroundTruth.csv (one-hot),
  ISIC_2019_Test_Input/ (no labels). ISIC_2019_Training_Metadata.csv carries no label and is
  not listed (training reads its lesion ids).
- ``isic2020``  train/ + ISIC_2020_Training_GroundTruth.csv or ..._v2.csv (the v2 file wins when
  both exist; label = ``benign_malignant``), test/ (no labels).
- ``folder``    every .jpg/.jpeg/.png below the root; image_id = relative path without
  extension. Any path component starting with "." or "_" is skipped (hidden files, __MACOSX,
  camjobs' own _staging output).

Each layout's spec also says where its lesion (or patient) ids live (``group_source``):
training splits by them, so that no lesion has images on both sides of the split.

Auto-detection looks at the root's top-level names; if nothing matches and the root holds a single
visible folder, that folder is tried as the dataset root (a zip's wrapping folder).

Every image named by a ground-truth CSV and every image file in the layout's image folders
becomes exactly one ``ImageRecord``; records that must not be processed carry ``error_type``:

- ``missing_file``  the CSV names an image that has no .jpg/.jpeg/.png file in the split's image
  folder(s); ``source_path`` is the first expected path, the message names the expected paths.
- ``invalid_path``  a CSV id that is not a plain file name (empty, contains "/", "\\", NUL or "..",
  or is absolute): it is never touched on disk and ``source_path`` is "". Also, on the local file
  system, an image whose real path (after symlinks, file or folder) lies outside the dataset root,
  unless ``follow_symlinks=True``.
- ``duplicate_id``  a second file (or CSV row) with an image_id already taken. The first one,
  sorted by (no error, path), keeps the id; later ones get "#2", "#3", ... appended so ids stay
  unique across records.

A CSV row whose label cannot be read (e.g. a one-hot row without a single 1) gives label None,
not an error; a CSV missing a required column raises ``LayoutError``.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import pyarrow.fs as pafs

from camjobs.config import LAYOUTS
from camjobs.errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
MASK_SUFFIX = "_segmentation"


class LayoutError(UsageError, ValueError):
    """The dataset root does not match the requested (or any known) layout."""


@dataclass(frozen=True)
class ImageRecord:
    image_id: str
    source_path: str  # absolute local path, or "<scheme>://<path>" for remote file systems
    label: str | None = None
    mask_path: str | None = None
    error_type: str | None = None
    error_message: str | None = None


@dataclass(frozen=True)
class DatasetListing:
    layout: str
    root: str
    classes: list[str]
    records: list[ImageRecord]


# --------------------------------------------------------------------------- label rules
# A rule gets one CSV row (all values as stripped strings) and the layout's classes.
LabelRule = Callable[[dict, tuple], "str | None"]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _column_label(column: str) -> LabelRule:
    # Values outside the vocabulary count as unreadable so `label in classes` always holds.
    return lambda row, classes: row[column] if row[column] in classes else None


def _one_hot_label(row: dict, classes: tuple) -> str | None:
    hot = [name for name in classes if _number(row[name]) == 1.0]
    return hot[0] if len(hot) == 1 else None


def _isic2017_label(row: dict, classes: tuple) -> str | None:
    flags = (_number(row["melanoma"]), _number(row["seborrheic_keratosis"]))
    return {(1.0, 0.0): "melanoma", (0.0, 1.0): "seborrheic_keratosis", (0.0, 0.0): "nevus"}.get(flags)


# --------------------------------------------------------------------------- layout table
@dataclass(frozen=True)
class _Split:
    image_dirs: tuple[str, ...]  # folders (relative to the dataset root) holding this split's images
    csvs: tuple[str, ...] = ()  # ground-truth CSV candidates; the first that exists is read


@dataclass(frozen=True)
class GroupSource:
    """Where a layout names each image's lesion (or patient): the group that a split keeps on one side."""

    csvs: tuple[str, ...]  # metadata CSV candidates relative to the dataset root; the first that exists is read
    id_column: str  # the image id
    group_column: str  # the lesion (or patient) id; also the prefix of the group names


@dataclass(frozen=True)
class _Spec:
    classes: tuple[str, ...]
    marker: str  # regex fully matching a top-level name that identifies the layout
    looks_for: str  # the same, for humans (error messages)
    splits: tuple[_Split, ...]
    id_column: str
    label_columns: tuple[str, ...]  # required in every CSV, together with id_column
    label_rule: LabelRule
    mask_dirs: tuple[str, ...] = ()  # folders of <image_id>_segmentation.png
    skip_stem_suffixes: tuple[str, ...] = ()  # files in image folders that are not inputs
    groups: GroupSource | None = None  # None: no lesion ids, every image is a group of its own


_ISIC2017_SPLITS = ("Training", "Validation", "Test_v2")
_ISIC2018_SPLITS = ("Training", "Validation", "Test")
_ISIC2018_CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
_ISIC2019_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")

_SPECS: dict[str, _Spec] = {
    "ham10000": _Spec(
        classes=("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"),
        marker=r"HAM10000_metadata\.csv|HAM10000_images_part_?\d",
        looks_for="HAM10000_metadata.csv or HAM10000_images_part_*/",
        splits=(
            _Split(
                ("HAM10000_images_part_1", "HAM10000_images_part_2", "HAM10000_images_part1", "HAM10000_images_part2"),
                ("HAM10000_metadata.csv",),
            ),
        ),
        id_column="image_id",
        label_columns=("dx",),
        label_rule=_column_label("dx"),
        mask_dirs=("HAM10000_segmentations_lesion_tschandl",),
        groups=GroupSource(("HAM10000_metadata.csv",), "image_id", "lesion_id"),
    ),
    "isic2017": _Spec(
        classes=("melanoma", "nevus", "seborrheic_keratosis"),
        marker=r"ISIC-2017_\w+_Data|ISIC-2017_\w+_Part3_GroundTruth\.csv",
        looks_for="ISIC-2017_*_Data/",
        splits=tuple(
            _Split((f"ISIC-2017_{s}_Data",), (f"ISIC-2017_{s}_Part3_GroundTruth.csv",)) for s in _ISIC2017_SPLITS
        ),
        id_column="image_id",
        label_columns=("melanoma", "seborrheic_keratosis"),
        label_rule=_isic2017_label,
        mask_dirs=tuple(f"ISIC-2017_{s}_Part1_GroundTruth" for s in _ISIC2017_SPLITS),
        skip_stem_suffixes=("_superpixels",),
    ),
    "isic2018": _Spec(
        classes=_ISIC2018_CLASSES,
        marker=r"ISIC2018_Task3_\w+",
        looks_for="ISIC2018_Task3_*",
        splits=tuple(
            _Split(
                (f"ISIC2018_Task3_{s}_Input",),
                (
                    f"ISIC2018_Task3_{s}_GroundTruth.csv",
                    f"ISIC2018_Task3_{s}_GroundTruth/ISIC2018_Task3_{s}_GroundTruth.csv",
                ),
            )
            for s in _ISIC2018_SPLITS
        ),
        id_column="image",
        label_columns=_ISIC2018_CLASSES,
        label_rule=_one_hot_label,
        mask_dirs=tuple(f"ISIC2018_Task1_{s}_GroundTruth" for s in _ISIC2018_SPLITS),
        groups=GroupSource(("ISIC2018_Task3_Training_LesionGroupings.csv",), "image", "lesion_id"),
    ),
    "isic2019": _Spec(
        classes=_ISIC2019_CLASSES,
        marker=r"ISIC_2019_Training_\w+(\.csv)?|ISIC_2019_Test_Input",
        looks_for="ISIC_2019_Training_*",
        splits=(
            _Split(("ISIC_2019_Training_Input",), ("ISIC_2019_Training_GroundTruth.csv",)),
            _Split(("ISIC_2019_Test_Input",)),
        ),
        id_column="image",
        label_columns=_ISIC2019_CLASSES,
        label_rule=_one_hot_label,
        groups=GroupSource(("ISIC_2019_Training_Metadata.csv",), "image", "lesion_id"),
    ),
    "isic2020": _Spec(
        classes=("benign", "malignant"),
        marker=r"ISIC_2020_Training_GroundTruth(_v2)?\.csv",
        looks_for="ISIC_2020_Training_GroundTruth.csv (with train/)",
        splits=(
            _Split(("train",), ("ISIC_2020_Training_GroundTruth_v2.csv", "ISIC_2020_Training_GroundTruth.csv")),
            _Split(("test",)),
        ),
        id_column="image_name",
        label_columns=("benign_malignant",),
        label_rule=_column_label("benign_malignant"),
        groups=GroupSource(
            ("ISIC_2020_Training_GroundTruth_v2.csv", "ISIC_2020_Training_GroundTruth.csv"), "image_name", "patient_id"
        ),
    ),
}


# --------------------------------------------------------------------------- file-system helpers
@dataclass(frozen=True)
class _Root:
    """An opened dataset root: the file system, the root path in it, and how to name files."""

    fs: pafs.FileSystem
    path: str  # the dataset root inside fs (where the layout's names live)
    scheme: str | None  # None for the local file system
    real_root: str | None  # local only: realpath of the root as given, for the symlink check
    follow_symlinks: bool

    def at(self, path: str) -> _Root:
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


def _open_root(uri: str, follow_symlinks: bool) -> _Root:
    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
    fs, path = pafs.FileSystem.from_uri(uri)
    path = path.rstrip("/") or "/"
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.Directory:
        raise LayoutError(
            f"dataset root {uri!r} is not a directory"
            if info.type == pafs.FileType.File
            else f"dataset root {uri!r} does not exist"
        )
    local = isinstance(fs, pafs.LocalFileSystem)
    return _Root(
        fs=fs,
        path=path,
        scheme=None if local else uri.split("://", 1)[0],
        real_root=os.path.realpath(path) if local else None,
        follow_symlinks=follow_symlinks,
    )


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _visible(name: str) -> bool:
    # Hidden files, macOS "._x.jpg"/__MACOSX debris and camjobs' own "_staging" are never inputs.
    return not name.startswith((".", "_"))


def _walk_files(root: _Root) -> Iterator[str]:
    """Paths of all visible files below root.path, each real file once."""
    if root.real_root is None:  # remote: one recursive listing is far cheaper than one per folder
        prefix = len(root.path.rstrip("/")) + 1
        for info in sorted(root.fs.get_file_info(pafs.FileSelector(root.path, recursive=True)), key=lambda i: i.path):
            if info.type == pafs.FileType.File and all(map(_visible, info.path[prefix:].split("/"))):
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
            if not _visible(info.base_name):
                continue
            if info.type == pafs.FileType.File:
                yield info.path
            elif info.type == pafs.FileType.Directory:
                (linked if os.path.islink(info.path) else subfolders).append(info.path)
        pending.extend(reversed(subfolders))


# --------------------------------------------------------------------------- detection
def _top_names(root: _Root) -> dict[str, pafs.FileType]:
    return {info.base_name: info.type for info in root.listdir(root.path) if _visible(info.base_name)}


def _matching_layouts(names) -> list[str]:
    return [name for name, spec in _SPECS.items() if any(re.fullmatch(spec.marker, n) for n in names)]


def _resolve(root: _Root, layout: str) -> tuple[str, _Root]:
    """Return the layout name and the root holding its files (the given root or its only folder)."""
    top = _top_names(root)
    found = _matching_layouts(top)
    folders = [name for name, kind in top.items() if kind == pafs.FileType.Directory]
    if not found and len(top) == 1 and folders:  # a zip's wrapping folder: dataset.zip -> dataset/HAM10000_...
        inner = root.at(root.join(folders[0]))
        inner_found = _matching_layouts(_top_names(inner))
        if inner_found and layout in ("auto", *inner_found):
            root, found = inner, inner_found
    if layout != "auto":
        return layout, root
    if len(found) > 1:
        raise LayoutError(
            f"{root.uri(root.path)} matches several layouts ({', '.join(found)}); pass the layout explicitly"
        )
    if found:
        return found[0], root
    if any(_is_image(path) for path in _walk_files(root)):
        return "folder", root
    looked_for = "; ".join(f"{spec.looks_for} ({name})" for name, spec in _SPECS.items())
    raise LayoutError(
        f"no known dataset layout in {root.uri(root.path)}: looked for {looked_for}; "
        f"or any {'/'.join(IMAGE_EXTENSIONS)} file below it (folder)"
    )


# --------------------------------------------------------------------------- listing
def _read_csv(root: _Root, path: str, spec: _Spec) -> list[dict]:
    import pandas as pd  # here: importing this module (for MASK_SUFFIX, LayoutError) stays light

    try:
        with root.fs.open_input_stream(path) as stream:
            table = pd.read_csv(stream, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise LayoutError(f"cannot read {root.uri(path)}: {exc}") from exc
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in (spec.id_column, *spec.label_columns) if c not in table.columns]
    if missing:
        raise LayoutError(f"{root.uri(path)} lacks required column(s) {', '.join(map(repr, missing))}")
    return [{k: str(v).strip() for k, v in row.items()} for row in table.to_dict("records")]


def _bad_id(image_id: str) -> bool:
    # Ids in these layouts are plain file names; anything else could reach outside the image folder.
    return (
        not image_id
        or ".." in image_id
        or any(c in image_id for c in "/\\\0")
        or os.path.isabs(image_id)
        or bool(re.match(r"[A-Za-z]:", image_id))
    )


def _file_record(root: _Root, image_id: str, path: str, label=None, mask=None) -> ImageRecord:
    if root.escapes(path):
        return ImageRecord(
            image_id,
            root.uri(path),
            label,
            mask,
            "invalid_path",
            f"{path}: symlink outside the dataset root; use --follow-symlinks to allow",
        )
    return ImageRecord(image_id, root.uri(path), label, mask)


def _masks(root: _Root, spec: _Spec) -> dict[str, str]:
    masks = {}
    for folder in spec.mask_dirs:
        for info in root.listdir(root.join(folder)):
            stem = _stem(info.base_name)
            if (
                info.type == pafs.FileType.File
                and _is_image(info.base_name)
                and stem.endswith(MASK_SUFFIX)
                and not root.escapes(info.path)
            ):
                masks.setdefault(stem[: -len(MASK_SUFFIX)], root.uri(info.path))
    return masks


def _split_images(root: _Root, spec: _Spec, folders: list[str]) -> dict[str, list[str]]:
    """image_id -> paths of the image files in a split's folders (folder order, then name order)."""
    files: dict[str, list[str]] = {}
    for folder in folders:
        for info in root.listdir(root.join(folder)):
            name, stem = info.base_name, _stem(info.base_name)
            if (
                info.type == pafs.FileType.File
                and _is_image(name)
                and not name.startswith(".")
                and not stem.endswith(spec.skip_stem_suffixes)
            ):
                files.setdefault(stem, []).append(info.path)
    return files


def _list_spec(root: _Root, spec: _Spec) -> list[ImageRecord]:
    masks = _masks(root, spec)
    records: list[ImageRecord] = []
    found_any = False
    for split in spec.splits:
        folders = [d for d in split.image_dirs if root.exists(root.join(d), pafs.FileType.Directory)]
        csv_path = next((p for p in map(root.join, split.csvs) if root.exists(p, pafs.FileType.File)), None)
        found_any |= bool(folders or csv_path)
        files = _split_images(root, spec, folders)
        named: set[str] = set()
        for line, row in enumerate(_read_csv(root, csv_path, spec) if csv_path else [], start=2):
            image_id, label = row[spec.id_column], spec.label_rule(row, spec.classes)
            if _bad_id(image_id):  # never looked up on disk
                where = f"{posixpath.basename(csv_path)} line {line}"
                records.append(
                    ImageRecord(
                        image_id or f"<empty id: {where}>",
                        "",
                        label,
                        None,
                        "invalid_path",
                        f"{where}: image id {image_id!r} is not a plain file name",
                    )
                )
                continue
            named.add(image_id)
            if image_id not in files:
                expected = [root.uri(root.join(d, image_id + ".jpg")) for d in folders or split.image_dirs]
                records.append(
                    ImageRecord(
                        image_id,
                        expected[0],
                        label,
                        masks.get(image_id),
                        "missing_file",
                        f"no image file for {image_id}: expected {' or '.join(expected)} (or .jpeg/.png, any case)",
                    )
                )
            records.extend(
                _file_record(root, image_id, path, label, masks.get(image_id)) for path in files.get(image_id, [])
            )
        for image_id, paths in files.items():  # image files the CSV does not name are inputs too
            if image_id not in named:
                records.extend(_file_record(root, image_id, path, None, masks.get(image_id)) for path in paths)
    if not found_any:
        wanted = sorted({d for s in spec.splits for d in s.image_dirs} | {c for s in spec.splits for c in s.csvs})
        raise LayoutError(f"{root.uri(root.path)} has none of the expected files/folders: {', '.join(wanted)}")
    return records


def _list_folder(root: _Root) -> list[ImageRecord]:
    prefix = len(root.path.rstrip("/")) + 1
    records = [_file_record(root, _stem(path[prefix:]), path) for path in _walk_files(root) if _is_image(path)]
    if not records:
        raise LayoutError(f"no {'/'.join(IMAGE_EXTENSIONS)} images below {root.uri(root.path)}")
    return records


def _unique_ids(records: list[ImageRecord]) -> list[ImageRecord]:
    """Keep the first record per image_id; rename later ones "<id>#2", "#3"... as duplicates."""
    records = sorted(records, key=lambda r: (r.image_id, r.error_type is not None, r.source_path))
    taken = {r.image_id for r in records}
    result, first = [], None
    for record in records:
        if first is None or record.image_id != first.image_id:
            first, count = record, 1
            result.append(record)
            continue
        count += 1
        while f"{record.image_id}#{count}" in taken:
            count += 1
        new_id = f"{record.image_id}#{count}"
        taken.add(new_id)
        result.append(
            replace(
                record,
                image_id=new_id,
                error_type=record.error_type or "duplicate_id",
                error_message=record.error_message
                or f"image_id {record.image_id!r} already used by {first.source_path}",
            )
        )
    return sorted(result, key=lambda r: r.image_id)


# --------------------------------------------------------------------------- public API
def detect_layout(uri: str) -> str:
    """Name of the layout found at uri (one of LAYOUTS); LayoutError if none matches."""
    return _resolve(_open_root(uri, follow_symlinks=False), "auto")[0]


def layouts_named_at(uri: str) -> list[str]:
    """The layouts whose names are at uri's top level: only names are looked at, nothing below is walked."""
    return _matching_layouts(_top_names(_open_root(uri, follow_symlinks=False)))


def group_source(layout: str) -> GroupSource | None:
    """Where the layout keeps its lesion (or patient) ids; None for a layout without them (isic2017, folder)."""
    spec = _SPECS.get(layout)
    return spec.groups if spec else None


def list_images(uri: str, layout: str = "auto", *, follow_symlinks: bool = False) -> DatasetListing:
    """All images of the dataset at uri as records sorted by image_id (see the module docstring)."""
    if layout != "auto" and layout not in LAYOUTS:
        raise LayoutError(f"unknown layout {layout!r}; expected 'auto' or one of {', '.join(LAYOUTS)}")
    layout, root = _resolve(_open_root(uri, follow_symlinks), layout)
    spec = _SPECS.get(layout)
    records = _list_folder(root) if spec is None else _list_spec(root, spec)
    return DatasetListing(layout, uri, list(spec.classes) if spec else [], _unique_ids(records))
