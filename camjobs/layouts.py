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
- ``isic-archive``  what ``isic image download`` (the ISIC Archive's isic-cli) writes: flat
  ISIC_<id>.jpg, metadata.csv (``isic_id``; label = the column ``label_column`` names, default
  ``diagnosis_3``, an empty cell is no label), attribution.txt, licenses/. Found by a metadata.csv
  with an ``isic_id`` column beside ISIC_*.jpg files; the classes are the column's values.
- ``folder``    every .jpg/.jpeg/.png below the root; image_id = relative path without
  extension. Any path component starting with "." or "_" is skipped (hidden files, __MACOSX,
  camjobs' own _staging output).

Each layout's spec also says where its lesion (or patient) ids live (``group_source``):
training splits by them, so that no lesion has images on both sides of the split (isic-archive:
``lesion_id``, else ``patient_id``, else the image itself).

Auto-detection looks at the root's top-level names (and, for isic-archive, metadata.csv's header
line); if nothing matches and the root holds a single visible folder, that folder is tried as the
dataset root (a zip's wrapping folder).

Every image named by a ground-truth CSV and every image file in the layout's image folders
becomes exactly one listing row (``camjobs.listing``: Arrow record batches, each file with its size
and modification time); rows that must not be processed carry ``error_type``:

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
not an error; a CSV missing a required column raises ``LayoutError``, and so does a
``label_column`` the CSV lacks (the isic-archive default missing only warns: no image has a label).
"""

from __future__ import annotations

import csv
import logging
import os
import posixpath
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from camjobs.config import LAYOUTS
from camjobs.dataset_root import FILES_SCHEMA, DatasetRoot, folder_files, folder_names, visible, walk_files
from camjobs.errors import UsageError
from camjobs.listing import DatasetListing, ImageRecord, ListingBuilder, file_rows, match_named
from camjobs.storage import open_filesystem

__all__ = ["DatasetListing", "ImageRecord", "LayoutError", "check_label_column", "detect_layout", "list_images"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
MASK_SUFFIX = "_segmentation"


class LayoutError(UsageError, ValueError):
    """The dataset root does not match the requested (or any known) layout."""


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


def _cell_label(column: str) -> LabelRule:
    # Any value is a class (the classes are the column's values); an empty cell or no such column is no label.
    return lambda row, classes: row.get(column) or None


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
    fallback_columns: tuple[str, ...] = ()  # read in this order where group_column's cell is empty
    image_depth: int = 1  # folders between the dataset root (where the CSVs lie) and the images


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
    label_column: str | None = None  # labels are this CSV column's values, which --label-column may change
    confirm: Callable[[DatasetRoot, dict], bool] | None = None  # a further check of the root once the marker matched


_ISIC2017_SPLITS = ("Training", "Validation", "Test_v2")
_ISIC2018_SPLITS = ("Training", "Validation", "Test")
_ISIC2018_CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
_ISIC2019_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")

_ARCHIVE_IMAGE = re.compile(r"ISIC_\d+\.(jpe?g|png)", re.IGNORECASE)


def _isic_archive_download(root: DatasetRoot, top: dict) -> bool:
    """isic-cli's metadata.csv names images by isic_id and lies beside them: a bare metadata.csv is no sign."""
    return any(map(_ARCHIVE_IMAGE.fullmatch, top)) and "isic_id" in _csv_header(root, root.join("metadata.csv"))


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
    "isic-archive": _Spec(
        classes=(),  # the label column's values
        marker=r"metadata\.csv",
        looks_for="metadata.csv with an isic_id column beside ISIC_*.jpg (isic image download)",
        splits=(_Split(("",), ("metadata.csv",)),),  # "": the images lie in the root itself
        id_column="isic_id",
        label_columns=(),  # the label column may be missing: then no image has a label
        label_rule=_cell_label("diagnosis_3"),
        groups=GroupSource(("metadata.csv",), "isic_id", "lesion_id", ("patient_id",), image_depth=0),
        # The diagnosis as HAM10000's dx and ISIC 2018/2019 name it (Nevus, Melanoma Invasive, ...); the
        # legacy benign_malignant is binary, diagnosis_1 (Benign/Malignant/Indeterminate) coarser still.
        label_column="diagnosis_3",
        confirm=_isic_archive_download,
    ),
}


# --------------------------------------------------------------------------- file-system helpers
def _open_root(uri: str, follow_symlinks: bool) -> DatasetRoot:
    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
    fs, path = open_filesystem(uri)
    path = path.rstrip("/") or "/"
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.Directory:
        raise LayoutError(
            f"dataset root {uri!r} is not a directory"
            if info.type == pafs.FileType.File
            else f"dataset root {uri!r} does not exist"
        )
    local = isinstance(fs, pafs.LocalFileSystem)
    return DatasetRoot(
        fs=fs,
        path=path,
        scheme=None if local else uri.split("://", 1)[0],
        real_root=os.path.realpath(path) if local else None,
        follow_symlinks=follow_symlinks,
    )


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _image_paths(paths: pa.Array) -> pa.Array:
    """_is_image on a column of paths."""
    return pc.match_substring_regex(paths, r"\.(" + "|".join(e[1:] for e in IMAGE_EXTENSIONS) + ")$", ignore_case=True)


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


# --------------------------------------------------------------------------- detection
def _top_names(root: DatasetRoot) -> dict[str, pafs.FileType]:
    """The root's visible names, but of its image files only a first one and a first ISIC-named one: no
    marker names an image, and a flat archive's million files would be a million objects here."""
    top, images = {}, set()
    for name, kind in filter(lambda entry: visible(entry[0]), folder_names(root, root.path)):
        if kind == pafs.FileType.File and _is_image(name):
            if (isic := bool(_ARCHIVE_IMAGE.fullmatch(name))) in images:
                continue
            images.add(isic)
        top[name] = kind
    return top


def _matching_layouts(root: DatasetRoot, top: dict[str, pafs.FileType]) -> list[str]:
    return [
        name
        for name, spec in _SPECS.items()
        if any(re.fullmatch(spec.marker, n) for n in top) and (spec.confirm is None or spec.confirm(root, top))
    ]


def _csv_header(root: DatasetRoot, path: str) -> list[str]:
    """A CSV file's column names, from its first line only; [] where there is no such file."""
    if not root.exists(path, pafs.FileType.File):
        return []
    with root.fs.open_input_stream(path) as stream:
        first = stream.read(1 << 16).decode("utf-8-sig", errors="replace").splitlines()[:1]
    return [name.strip() for name in next(csv.reader(first), [])]


def _resolve(root: DatasetRoot, layout: str) -> tuple[str, DatasetRoot]:
    """Return the layout name and the root holding its files (the given root or its only folder)."""
    top = _top_names(root)
    found = _matching_layouts(root, top)
    folders = [name for name, kind in top.items() if kind == pafs.FileType.Directory]
    if not found and len(top) == 1 and folders:  # a zip's wrapping folder: dataset.zip -> dataset/HAM10000_...
        inner = root.at(root.join(folders[0]))
        inner_found = _matching_layouts(inner, _top_names(inner))
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
    if any(pc.any(_image_paths(batch["path"])).as_py() for batch in walk_files(root)):
        return "folder", root
    looked_for = "; ".join(f"{spec.looks_for} ({name})" for name, spec in _SPECS.items())
    raise LayoutError(
        f"no known dataset layout in {root.uri(root.path)}: looked for {looked_for}; "
        f"or any {'/'.join(IMAGE_EXTENSIONS)} file below it (folder)"
    )


# --------------------------------------------------------------------------- listing
def _read_csv(root: DatasetRoot, path: str, spec: _Spec) -> Iterator[dict]:
    """The CSV's rows as dicts of the columns the labels need, read a chunk of rows at a time."""
    import pandas as pd  # here: importing this module (for MASK_SUFFIX, LayoutError) stays light

    options = {"dtype": str, "keep_default_na": False, "encoding": "utf-8-sig"}
    try:
        with root.fs.open_input_stream(path) as stream:
            header = [str(c).strip() for c in pd.read_csv(stream, nrows=0, **options).columns]
        missing = [c for c in (spec.id_column, *spec.label_columns) if c not in header]
        if missing:
            raise LayoutError(f"{root.uri(path)} lacks required column(s) {', '.join(map(repr, missing))}")
        # Only the columns the labels need: an archive's metadata.csv has dozens per image.
        wanted = [c for c in dict.fromkeys((spec.id_column, *spec.label_columns, spec.label_column)) if c in header]
        with root.fs.open_input_stream(path) as stream:
            for chunk in pd.read_csv(
                stream, usecols=lambda c: str(c).strip() in wanted, chunksize=_CSV_ROWS, **options
            ):
                chunk.columns = [str(c).strip() for c in chunk.columns]
                for values in zip(*(chunk[c] for c in wanted)):
                    yield dict(zip(wanted, (str(v).strip() for v in values)))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise LayoutError(f"cannot read {root.uri(path)}: {exc}") from exc


def _bad_id(image_id: str) -> bool:
    # Ids in these layouts are plain file names; anything else could reach outside the image folder.
    return (
        not image_id
        or ".." in image_id
        or any(c in image_id for c in "/\\\0")
        or os.path.isabs(image_id)
        or bool(re.match(r"[A-Za-z]:", image_id))
    )


_CSV_ROWS = 16384  # CSV rows read, labelled and matched against the files at a time


def _masks(root: DatasetRoot, spec: _Spec) -> pa.Table:
    """image_id -> mask_path of the layout's masks (the first found per image)."""
    masks: dict[str, str] = {}
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
    return pa.table(
        {"image_id": pa.array(list(masks), pa.string()), "mask_path": pa.array(list(masks.values()), pa.string())}
    )


def _split_images(root: DatasetRoot, spec: _Spec, folders: list[str]) -> pa.Table:
    """The image files of a split's folders as a table (image_id, path, file_size, file_mtime_ns, escapes),
    gathered from streamed batches of each folder's files."""
    parts = []
    for folder in folders:
        for batch in folder_files(root, root.join(folder)):
            names = pc.replace_substring_regex(batch["path"], r"^.*/", "")
            stems = pc.replace_substring_regex(names, r"\.[^.]*$", "")
            keep = pc.and_(_image_paths(names), pc.invert(pc.starts_with(names, ".")))
            for suffix in spec.skip_stem_suffixes:
                keep = pc.and_(keep, pc.invert(pc.ends_with(stems, suffix)))
            columns = [stems, batch["path"], batch["size"], batch["mtime_ns"], batch["escapes"]]
            parts.append(pa.table(columns, names=_FILE_COLUMNS).filter(keep))
    empty = pa.table([pa.array([], pa.string()), *FILES_SCHEMA.empty_table().columns], names=_FILE_COLUMNS)
    return pa.concat_tables(parts) if parts else empty


_FILE_COLUMNS = ["image_id", "path", "file_size", "file_mtime_ns", "escapes"]  # FILES_SCHEMA's, path's stem first


def _named_rows(root: DatasetRoot, spec: _Spec, csv_path: str | None, out: ListingBuilder) -> pa.Table:
    """The CSV's valid rows as a table (image_id, label); an invalid id becomes an error row at once.
    The label rules run per row in Python, a chunk of rows at a time."""
    parts, ids, labels = [], [], []
    for line, row in enumerate(_read_csv(root, csv_path, spec) if csv_path else [], start=2):
        image_id, label = row[spec.id_column], spec.label_rule(row, spec.classes)
        if _bad_id(image_id):  # never looked up on disk
            where = f"{posixpath.basename(csv_path)} line {line}"
            out.add(
                image_id or f"<empty id: {where}>",
                "",
                label,
                error_type="invalid_path",
                error_message=f"{where}: image id {image_id!r} is not a plain file name",
            )
            continue
        ids.append(image_id)
        labels.append(label)
        if len(ids) >= _CSV_ROWS:
            parts.append(pa.table({"image_id": pa.array(ids, pa.string()), "label": pa.array(labels, pa.string())}))
            ids, labels = [], []
    parts.append(pa.table({"image_id": pa.array(ids, pa.string()), "label": pa.array(labels, pa.string())}))
    return pa.concat_tables(parts)


def _missing_rows(root: DatasetRoot, missing: pa.Table, expected_dirs) -> pa.Table:
    """CSV rows without an image file as missing_file error rows."""
    ids = missing["image_id"]
    expected = [pc.binary_join_element_wise(root.uri(root.join(d, "")), ids, ".jpg", "") for d in expected_dirs]
    parts = [val for pair in zip([" or "] * len(expected), expected) for val in pair][1:]
    message = pc.binary_join_element_wise(
        "no image file for ", ids, ": expected ", *parts, " (or .jpeg/.png, any case)", ""
    )
    return pa.table(
        {
            "image_id": ids,
            "source_path": expected[0],
            "label": missing["label"],
            "mask_path": missing["mask_path"],
            "error_type": pa.repeat(pa.scalar("missing_file"), missing.num_rows),
            "error_message": message,
        }
    )


def _list_spec(root: DatasetRoot, spec: _Spec, out: ListingBuilder) -> None:
    """Each split's files and CSV rows matched on the id with vector lookups: a named file is a labelled
    input, a named id without a file a missing_file error, a file the CSV does not name an input without label."""
    masks = _masks(root, spec)
    found_any = False
    for split in spec.splits:
        folders = [d for d in split.image_dirs if root.exists(root.join(d), pafs.FileType.Directory)]
        csv_path = next((p for p in map(root.join, split.csvs) if root.exists(p, pafs.FileType.File)), None)
        found_any |= bool(csv_path or any(folders))  # the root itself ("") always exists: no sign of the layout
        files = _split_images(root, spec, folders)
        named = _named_rows(root, spec, csv_path, out)
        rows, missing = match_named(files, named)
        del files, named
        mask_at = pc.index_in(rows["image_id"], value_set=masks["image_id"])
        if rows.num_rows:
            out.add_table(file_rows(root.scheme, rows, label=rows["label"], mask_path=masks["mask_path"].take(mask_at)))
        if missing.num_rows:
            mask_at = pc.index_in(missing["image_id"], value_set=masks["image_id"])
            missing = missing.append_column("mask_path", masks["mask_path"].take(mask_at))
            out.add_table(_missing_rows(root, missing, folders or split.image_dirs))
    if not found_any:
        wanted = sorted(
            ({d for s in spec.splits for d in s.image_dirs} | {c for s in spec.splits for c in s.csvs}) - {""}
        )
        raise LayoutError(f"{root.uri(root.path)} has none of the expected files/folders: {', '.join(wanted)}")


def _list_folder(root: DatasetRoot, out: ListingBuilder) -> None:
    """Every image below the root, a walk's batch at a time, on columns: image_id is the path below the
    root without its extension."""
    prefix = len(root.path.rstrip("/")) + 1
    found = 0
    for batch in walk_files(root):
        files = pa.Table.from_batches([batch]).filter(_image_paths(batch["path"]))
        if files.num_rows == 0:
            continue
        found += files.num_rows
        image_ids = pc.replace_substring_regex(pc.utf8_slice_codeunits(files["path"], prefix), r"\.[^.]*$", "")
        files = pa.table(
            [image_ids, files["path"], files["size"], files["mtime_ns"], files["escapes"]], names=_FILE_COLUMNS
        )
        out.add_table(file_rows(root.scheme, files))
    if not found:
        raise LayoutError(f"no {'/'.join(IMAGE_EXTENSIONS)} images below {root.uri(root.path)}")


# --------------------------------------------------------------------------- public API
def detect_layout(uri: str) -> str:
    """Name of the layout found at uri (one of LAYOUTS); LayoutError if none matches."""
    return _resolve(_open_root(uri, follow_symlinks=False), "auto")[0]


def check_label_column(uri: str, layout: str, label_column: str) -> None:
    """LayoutError unless the dataset at uri is in a layout that takes --label-column and its CSVs have that
    column: the CSV headers only, so that a run can refuse before it creates anything."""
    found, root = _resolve(_open_root(uri, follow_symlinks=False), layout)
    _labelled_by(root, found, _SPECS.get(found), label_column)


def layouts_named_at(uri: str) -> list[str]:
    """The layouts whose names are at uri's top level: only names are looked at, nothing below is walked."""
    root = _open_root(uri, follow_symlinks=False)
    return _matching_layouts(root, _top_names(root))


def group_source(layout: str) -> GroupSource | None:
    """Where the layout keeps its lesion (or patient) ids; None for a layout without them (isic2017, folder)."""
    spec = _SPECS.get(layout)
    return spec.groups if spec else None


def _labelled_by(root: DatasetRoot, layout: str, spec: _Spec | None, column: str | None) -> _Spec | None:
    """The spec with its labels from `column` (--label-column; None: the spec's default), checked against
    its CSVs' columns: a chosen column they lack is a usage error, a default one leaves the images unlabelled."""
    if spec is None or spec.label_column is None:
        if column is None:
            return spec
        choosing = ", ".join(name for name, s in _SPECS.items() if s.label_column)
        raise LayoutError(f"--label-column is for the {choosing} layout; {layout} has labels of its own")
    for path in (root.join(name) for split in spec.splits for name in split.csvs):
        header = _csv_header(root, path)
        if not header or (column or spec.label_column) in header:
            continue
        columns = ", ".join(c for c in header if c != spec.id_column)
        if column is not None:
            raise LayoutError(f"--label-column {column!r}: {root.uri(path)} has no such column; its columns: {columns}")
        log.warning(
            "%s has no %r column, so no image has a label; choose one with --label-column: %s",
            root.uri(path),
            spec.label_column,
            columns,
        )
    column = column or spec.label_column
    return replace(spec, label_column=column, label_rule=_cell_label(column))


def list_images(
    uri: str, layout: str = "auto", *, follow_symlinks: bool = False, label_column: str | None = None
) -> DatasetListing:
    """All images of the dataset at uri as an Arrow table sorted by image_id (see the module docstring).

    label_column: the CSV column that holds the labels, for a layout that lets one choose (isic-archive)."""
    if layout != "auto" and layout not in LAYOUTS:
        raise LayoutError(f"unknown layout {layout!r}; expected 'auto' or one of {', '.join(LAYOUTS)}")
    layout, root = _resolve(_open_root(uri, follow_symlinks), layout)
    spec = _labelled_by(root, layout, _SPECS.get(layout), label_column)
    out = ListingBuilder()
    _list_folder(root, out) if spec is None else _list_spec(root, spec, out)
    table = out.table()
    # A layout without a fixed vocabulary has the classes its labels name.
    named = pc.unique(table["label"].drop_null()).to_pylist()
    classes = list(spec.classes) if spec and spec.classes else sorted(label for label in named if label)
    return DatasetListing(layout, uri, classes, table)
