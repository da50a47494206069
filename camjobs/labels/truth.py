"""Ground truth for ``camjobs evaluate`` and ``camjobs viz``: lesion masks of a dataset or a folder, or COCO boxes.

A lesion mask (binarized ``> 127``, ``geometry.read_mask``) gives one box, the tightest box
around all its pixels (``geometry.mask_box``), and the pixels for PxAP and the Jaccard; a mask
stored at another size than its image is resized to it by nearest neighbour. A COCO file gives
boxes ``[x, y, w, h]`` -> ``(x, y, x + w, y + h)`` (several per image: the best IoU counts),
rescaled where the file's image size differs from the row's, and no pixels. Images are matched
by image_id, else by its base name.

No torch, no Ray: the label tools import it.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from camjobs.geometry import mask_box, read_mask, resize_mask_nearest, xywh_to_xyxy
from camjobs.labels.scores import EvaluationError, GroundTruth
from camjobs.layouts import MASK_SUFFIX
from camjobs.storage import open_filesystem

MASK_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


# --------------------------------------------------------------------------- mask folders and datasets
def dataset_masks(data: str, layout: str = "auto") -> tuple[dict[str, str], str]:
    """image_id -> mask path of a dataset's images that have a lesion mask (camjobs.layouts), and its layout."""
    from camjobs.layouts import list_images  # pandas: only for the commands that take a dataset

    listing = list_images(data, layout)
    return {r.image_id: r.mask_path for r in listing.records if r.mask_path}, listing.layout


def _strip_ext(name: str) -> str:
    stem, ext = posixpath.splitext(name)
    return stem if ext else name


def index_mask_folder(folder: str) -> dict[str, str]:
    """image_id -> mask path for a folder of ``<id>_segmentation.png`` or ``<id>.png`` files.

    Keys: the path relative to the folder without extension (and without ``_segmentation``),
    and the file name alone when no other file has the same; ``_segmentation`` files win.
    """
    fs, root = open_filesystem(folder.rstrip("/") or "/")
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise EvaluationError(f"mask folder {folder!r} does not exist")
    scheme = folder.split("://", 1)[0] + "://" if "://" in folder else ""
    found = []
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        relative = info.path[len(root.rstrip("/")) + 1 :]
        if info.type != pafs.FileType.File or not relative.lower().endswith(MASK_EXTENSIONS):
            continue
        if any(part.startswith(".") for part in relative.split("/")):
            continue
        stem = _strip_ext(relative)
        segmentation = stem.endswith(MASK_SUFFIX)
        if segmentation:
            stem = stem[: -len(MASK_SUFFIX)]
        found.append((not segmentation, relative, stem, scheme + info.path if scheme else info.path))
    index: dict[str, str] = {}
    by_base: dict[str, set[str]] = {}
    for _, _, stem, path in sorted(found):
        index.setdefault(stem, path)
        by_base.setdefault(posixpath.basename(stem), set()).add(path)
    for base, paths in by_base.items():
        if len(paths) == 1 and base not in index:
            index[base] = paths.pop()
    return index


# --------------------------------------------------------------------------- COCO boxes
@dataclass
class CocoImage:
    boxes: list[tuple[float, float, float, float]]
    width: float | None
    height: float | None


def _add_keys(index: dict[str, Any], ambiguous: set[str], keys: Iterable[str], value: Any) -> None:
    for key in dict.fromkeys(keys):
        if key in index and index[key] is not value:
            ambiguous.add(key)
        else:
            index.setdefault(key, value)


def _read_json(path: str) -> Any:
    fs, inner = open_filesystem(path)
    with fs.open_input_file(inner) as stream:
        return json.loads(stream.read())


def load_coco_boxes(path: str) -> dict[str, CocoImage]:
    """image key -> boxes from a COCO json (``bbox`` [x, y, w, h] -> xyxy).

    Keys: ``file_name`` without extension, its base name (when unique) and ``str(id)``.
    """
    try:
        data = _read_json(path)
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"cannot read COCO boxes {path}: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(data.get(key), list) for key in ("images", "annotations")):
        raise EvaluationError(f"{path}: not a COCO file (needs 'images' and 'annotations' lists)")
    by_id: dict[Any, CocoImage] = {}
    index: dict[str, CocoImage] = {}
    ambiguous: set[str] = set()
    for image in data["images"]:
        entry = CocoImage([], image.get("width"), image.get("height"))
        by_id[image["id"]] = entry
        name = str(image.get("file_name", "")).replace("\\", "/")
        keys = [_strip_ext(name), posixpath.basename(_strip_ext(name))] if name else []
        _add_keys(index, ambiguous, keys, entry)
    for key in ambiguous:
        index.pop(key, None)
    for image_id, entry in by_id.items():
        index.setdefault(str(image_id), entry)
    for annotation in data["annotations"]:
        entry = by_id.get(annotation.get("image_id"))
        bbox = annotation.get("bbox")
        if entry is None or not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            continue
        x, y, w, h = map(float, bbox)
        if w > 0 and h > 0:
            entry.boxes.append(xywh_to_xyxy((x, y, w, h)))
    return index


# --------------------------------------------------------------------------- one source of ground truth
class TruthSource:
    """Ground truth for an image_id from a dataset, a mask folder or a COCO file."""

    def __init__(self, data: str | None, masks: str | None, boxes: str | None):
        given = [name for name, value in (("data", data), ("masks", masks), ("boxes", boxes)) if value]
        if len(given) != 1:
            raise EvaluationError(
                "give exactly one source of ground truth: data (--data, a dataset with masks), "
                "masks (--masks, a folder of masks) or boxes (--boxes, a COCO json)"
            )
        self.masks: dict[str, str] = {}
        self.coco: dict[str, CocoImage] | None = None
        if data:
            from camjobs.layouts import LayoutError

            try:
                self.masks, layout = dataset_masks(data)
            except LayoutError as exc:
                raise EvaluationError(str(exc)) from exc
            if not self.masks:
                raise EvaluationError(f"{data} ({layout} layout) has no lesion masks; give masks= or boxes=")
            self.description = f"masks of the {layout} dataset {data}"
        elif masks:
            self.masks = index_mask_folder(masks)
            if not self.masks:
                raise EvaluationError(f"no mask images in {masks}")
            self.description = f"masks in {masks}"
        else:
            self.coco = load_coco_boxes(boxes)
            self.description = f"COCO boxes {boxes}"
        self.counts = {"mask_resized": 0, "boxes_rescaled": 0}

    def lookup(self, image_id: str, width: int, height: int) -> GroundTruth | None:
        """None without ground truth; a GroundTruth with no boxes when the mask or boxes are empty."""
        if self.coco is not None:
            entry = self.coco.get(image_id) or self.coco.get(posixpath.basename(image_id))
            if entry is None:
                return None
            boxes = entry.boxes
            if entry.width and entry.height and (entry.width, entry.height) != (width, height):
                sx, sy = width / float(entry.width), height / float(entry.height)
                boxes = [(x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in boxes]
                self.counts["boxes_rescaled"] += 1
            return GroundTruth(list(boxes))
        path = self.masks.get(image_id) or self.masks.get(posixpath.basename(image_id))
        if path is None:
            return None
        mask = read_mask(path)
        if mask.shape != (height, width):
            mask = resize_mask_nearest(mask, width, height)
            self.counts["mask_resized"] += 1
        box = mask_box(mask)
        return GroundTruth([box] if box else [], mask)
