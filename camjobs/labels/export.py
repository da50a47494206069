"""Export the weak boxes of DIR/cams to the formats labeling and detection tools import.

``camjobs export --output DIR --format coco|labelstudio|yolo --to PATH [--boxes auto|cam|refined]``
(yolo: ``[--images link|copy] [--val-fraction F]``; ``--format isic-csv``, every class's probability rather
than boxes: camjobs.labels.isic_csv)

Which rows
    Every row of DIR/cams, one per image_id: where an image_id has rows from several runs
    (a re-run, an incremental run over a changed file, a new model), the row of the newest
    run wins (run ids start with their UTC start time, so the largest run_id is the newest).
    Boxes with ``score < --min-score`` are dropped; an image whose boxes are all dropped is
    still listed (COCO, Label Studio) with no box, and is left out of a YOLO dataset (where an
    image without labels would teach "no lesion here").

Which boxes (--boxes)
    ``cam``: the CAM's own boxes (``boxes``), exactly what exports wrote before masks existed.
    ``refined``: the boxes of the refined lesion mask (``refined_boxes``, from ``camjobs run
    --refine``), each with its part of the mask (``mask_rle``: the 8-connected component whose box
    it is); an image without refined boxes (a run without --refine, a version-1 file, a map with
    nothing to refine) is still listed with no box, and the summary counts them. ``auto``
    (default): refined where the row has refined boxes, else the row's CAM boxes; on output
    without any refinement it is ``cam``. --min-score applies to either kind of box.

Which file name
    ``file_name`` is the image's path relative to the dataset root of the run that wrote the
    row (``config.data`` in DIR/runs/<run_id>.json), e.g.
    ``ISIC-2017_Training_Data/ISIC_0014628.jpg``, so ``--image-root`` is the URL under which that
    dataset root is served: ``<image-root>/<file_name>``, URL-quoted. Where the root cannot be
    derived (no run summary, a path outside the root) it is the source file's base name.

Categories
    ``--categories lesion`` (default): one category, "lesion". ``--categories classes``: the
    model's classes (from the run summary, in the model's order, else the sorted target labels);
    each box gets the ``target_label`` of its image, the class its map explains.

Formats
    coco        one JSON file (camjobs.labels.coco): ``images`` (in image_id order; id: a number
                from the image_id's SHA-256, ``coco_image_id``, so an image has the same id in every
                export of it, whatever the other rows; file_name, width, height,
                ``camjobs_image_id``, ``coco_url`` with --image-root), ``annotations`` (ids 1..N;
                bbox ``[x, y, w, h]`` absolute pixels, ``w = x_max - x_min``, area, score, iscrowd
                0), ``categories`` (ids from 1). An export whose boxes were all dropped is a valid
                dataset with ``annotations: []``. ``annotations`` alone is a result list for
                ``pycocotools.coco.COCO.loadRes``, except an empty one, on which loadRes raises
                (cocoapi issue 450): ``load_coco_results`` takes either. A refined box's annotation
                also has ``segmentation``, its mask as compressed RLE (``{"size": [h, w], "counts": str}``,
                what ``COCO.annToMask`` decodes), and ``area`` is the mask's pixel count. iscrowd
                stays 0: each annotation is one lesion (one component), and iscrowd 1 would make it
                an ignore region wherever the file serves as ground truth (COCOeval); loadRes
                likewise sets iscrowd 0 on RLE results. A CAM box's annotation has no
                segmentation: use --boxes refined for a file whose every annotation has a mask.
    labelstudio a JSON list of tasks with predictions (Label Studio's import format: rectangle
                values in percent of original_width/original_height), plus the labeling config
                next to it, ``<PATH minus .json>.label_config.xml``. Without --image-root the task's
                image is the source path as written (s3://, gs:// URIs are served by Label Studio
                through a connected cloud storage); local paths need --image-root. A refined box
                also gets its mask's outline as a ``polygonlabels`` region (control "polygon",
                points ``[x%, y%]`` at the outline's pixel centres, closed, rounded to 1e-4 %),
                and then the config has a PolygonLabels control beside the RectangleLabels.
    yolo        a directory in Ultralytics' dataset layout (data.yaml, images/, labels/,
                manifest.csv): see camjobs.labels.yolo.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

import pyarrow as pa
import pyarrow.fs as pafs

from camjobs.config import DEFAULT_VAL_FRACTION, BoxSource, CategoryMode, ExportFormat, ImageMode
from camjobs.errors import UsageError
from camjobs.geometry import (
    Box,
    box_components,
    box_xyxy,
    mask_polygons,
    rle_area,
    rle_decode,
    rle_encode,
    rle_mask,
)
from camjobs.output import NoResults, read_newest_cams, read_run_summaries
from camjobs.schema import ImageRow
from camjobs.storage import open_filesystem

log = logging.getLogger(__name__)

FORMATS = ExportFormat.values()
CATEGORY_MODES = CategoryMode.values()
BOX_SOURCES = BoxSource.values()
IMAGE_MODES = ImageMode.values()
LESION = "lesion"
LABEL_CONFIG_SUFFIX = ".label_config.xml"
POLYGON_DECIMALS = 4  # percent: 1e-4 % of a 100,000 px side is 0.1 px

# Everything an export needs; heatmaps and raw maps (the heavy columns) are never read.
EXPORT_COLUMNS = (
    "image_id",
    "source_path",
    "width",
    "height",
    "label",
    "pred_label",
    "pred_score",
    "target_label",
    "boxes",
    "mask_rle",
    "refined_boxes",
    "model_sha256",
    "run_id",
)


class ExportError(UsageError, ValueError):
    """Bad export options, or nothing to export from."""


# --------------------------------------------------------------------------- reading DIR/cams and DIR/runs
def _read_output(output: str) -> tuple[pa.Table, dict[str, dict]]:
    """The newest row per image of OUTPUT/cams (EXPORT_COLUMNS) and the summaries of their runs."""
    try:
        table = read_newest_cams(output, EXPORT_COLUMNS)
    except NoResults as exc:
        raise ExportError(str(exc)) from exc
    summaries, missing = read_run_summaries(output, table["run_id"].to_pylist())
    for run_id, why in missing.items():
        log.warning("run %s has no readable summary (%s): file names fall back to base names", run_id, why)
    return table, summaries


# --------------------------------------------------------------------------- file names
def _root_of(data: str | None) -> str | None:
    """The dataset root as source paths spell it: a URI as given, a local path as given or made absolute."""
    if not data:
        return None
    data = data.rstrip("/") or "/"
    if data.startswith("file://"):
        return data[len("file://") :].rstrip("/") or "/"
    return data


def relative_file_name(source_path: str, data: str | None) -> str:
    """source_path relative to the dataset root `data`, else its base name."""
    base = posixpath.basename(source_path.replace("\\", "/")) or source_path
    root = _root_of(data)
    if root is None:
        return base
    if "://" in root or os.path.isabs(root):
        prefix = root if root.endswith("/") else root + "/"
        return source_path[len(prefix) :] if source_path.startswith(prefix) else base
    # A relative --data (resolved against the run's working directory, which is not recorded):
    # find it as a run of whole path components inside the absolute source path.
    parts = [p for p in root.split("/") if p not in ("", ".")]
    source_parts = source_path.split("/")
    for start in range(len(source_parts) - len(parts) - 1, -1, -1):
        if source_parts[start : start + len(parts)] == parts:
            return "/".join(source_parts[start + len(parts) :])
    return base


def image_url(image_root: str, file_name: str) -> str:
    """<image_root>/<file_name>, the file name percent-quoted (its "/" kept)."""
    quoted = quote(file_name, safe="/")
    if image_root.endswith(("/", "=")):  # e.g. Label Studio's /data/local-files/?d=
        return image_root + quoted
    return f"{image_root}/{quoted}"


def stable_hash(image_id: str) -> int:
    """64 bits of the image_id's SHA-256: the same number for the same image in every export."""
    return int.from_bytes(hashlib.sha256(image_id.encode("utf-8")).digest()[:8], "big")


# --------------------------------------------------------------------------- the export model
@dataclass(frozen=True, kw_only=True)
class ExportBox(Box):
    category: str
    segmentation: dict | None = None  # COCO RLE of this box's part of the refined mask

    @property
    def area(self) -> float:
        """COCO's area: the mask's pixel count where the box has one, else the box's."""
        if self.segmentation is not None:
            return rle_area(self.segmentation)
        return super().area


@dataclass(kw_only=True)
class ExportImage(ImageRow):
    file_name: str  # relative to the dataset root
    model_sha256: str | None
    boxes: list[ExportBox] = field(default_factory=list)
    refined: bool = False  # boxes (if any) come from refined_boxes


@dataclass
class ExportPlan:
    images: list[ExportImage]
    categories: list[str]  # category i is COCO id i + 1 and YOLO class i
    dropped_boxes: int  # below --min-score
    box_source: str = "auto"

    @property
    def refined_images(self) -> int:
        return sum(image.refined for image in self.images)


def _clean_score(value) -> float | None:
    return None if value is None else round(float(value), 6)


def _box_segmentations(rle: dict | None, boxes: Sequence[dict], width: int, height: int) -> list[dict | None]:
    """COCO RLE of each refined box's part of the mask; a single box's is the row's mask as is."""
    if rle is None:
        return [None] * len(boxes)
    if len(boxes) == 1 and [int(v) for v in rle["size"]] == [height, width]:
        return [{"size": [height, width], "counts": rle["counts"]}]
    return [rle_encode(part) for part in box_components(rle_mask(rle, width, height), boxes)]


def _chosen_boxes(row: dict, source: str) -> tuple[list[dict], list[dict | None], bool]:
    """(boxes, their masks or None, refined?) of a row under --boxes `source`."""
    if source == "cam" or row["refined_boxes"] is None:
        boxes = [] if source == "refined" else list(row["boxes"] or [])
        return boxes, [None] * len(boxes), False
    boxes = list(row["refined_boxes"])
    return boxes, _box_segmentations(row["mask_rle"], boxes, int(row["width"]), int(row["height"])), True


def plan_export(output: str, *, min_score: float = 0.0, categories: str = LESION, boxes: str = "auto") -> ExportPlan:
    """Read DIR/cams (newest row per image) and DIR/runs, choose and filter boxes, name files and categories."""
    if categories not in CATEGORY_MODES:
        raise ExportError(f"--categories must be one of {', '.join(CATEGORY_MODES)}, got {categories!r}")
    if boxes not in BOX_SOURCES:
        raise ExportError(f"--boxes must be one of {', '.join(BOX_SOURCES)}, got {boxes!r}")
    table, summaries = _read_output(output)
    model_classes: list[str] = []
    for run_id in sorted(summaries, reverse=True):  # newest model first
        for name in summaries[run_id].get("model", {}).get("classes", []) or []:
            if name not in model_classes:
                model_classes.append(str(name))
    images, dropped, seen_targets = [], 0, []
    for row in table.to_pylist():
        data = summaries.get(row["run_id"], {}).get("config", {}).get("data")
        target = row["target_label"]
        category = LESION if categories == LESION else (target if target is not None else LESION)
        if category not in seen_targets:
            seen_targets.append(category)
        chosen, masks, refined = _chosen_boxes(row, boxes)
        kept = []
        for box, mask in zip(chosen, masks):
            if box["score"] is not None and box["score"] < min_score:
                dropped += 1
                continue
            kept.append(
                ExportBox(*box_xyxy(box), _clean_score(box["score"]) or 0.0, category=category, segmentation=mask)
            )
        images.append(
            ExportImage(
                image_id=row["image_id"],
                source_path=row["source_path"] or "",
                file_name=relative_file_name(row["source_path"] or row["image_id"], data),
                width=int(row["width"]),
                height=int(row["height"]),
                label=row["label"],
                pred_label=row["pred_label"],
                pred_score=_clean_score(row["pred_score"]),
                target_label=target,
                model_sha256=row["model_sha256"],
                run_id=row["run_id"],
                boxes=kept,
                refined=refined,
            )
        )
    if categories == LESION:
        names = [LESION]
    else:
        names = [c for c in model_classes] + sorted(c for c in seen_targets if c not in model_classes)
        names = names or [LESION]
    return ExportPlan(images, names, dropped, boxes)


# --------------------------------------------------------------------------- Label Studio
# The control (from_name) of each region type, as label_config names them.
CONTROLS = {"rectanglelabels": ("label", "RectangleLabels"), "polygonlabels": ("polygon", "PolygonLabels")}


def label_config(categories: Sequence[str], *, polygons: bool = False) -> str:
    """The labeling config that matches the tasks: an Image named "image", RectangleLabels "label"
    and, where the tasks hold outlines, PolygonLabels "polygon" with the same labels."""
    labels = "\n".join(f"    <Label value={quoteattr(name)}/>" for name in categories)
    kinds = ("rectanglelabels", "polygonlabels") if polygons else ("rectanglelabels",)
    controls = "".join(
        f'  <{CONTROLS[kind][1]} name="{CONTROLS[kind][0]}" toName="image">\n{labels}\n  </{CONTROLS[kind][1]}>\n'
        for kind in kinds
    )
    return '<View>\n  <Image name="image" value="$image"/>\n' + controls + "</View>\n"


def _region(region_id: str, kind: str, image: ExportImage, value: dict, score: float) -> dict:
    """One result of a prediction, in Label Studio's import format."""
    return {
        "id": region_id,
        "type": kind,
        "from_name": CONTROLS[kind][0],
        "to_name": "image",
        "original_width": image.width,
        "original_height": image.height,
        "image_rotation": 0,
        "value": value,
        "score": score,
    }


def outline_points(segmentation: dict, width: int, height: int) -> list[list[list[float]]]:
    """The outlines of a box's mask as Label Studio polygon points: the outline's pixel centres
    (x + 0.5, y + 0.5, as the rectangles' edges, in continuous image coordinates) in percent."""
    return [
        [
            [round(100.0 * (x + 0.5) / width, POLYGON_DECIMALS), round(100.0 * (y + 0.5) / height, POLYGON_DECIMALS)]
            for x, y in outline
        ]
        for outline in mask_polygons(rle_decode(segmentation))
    ]


def _box_regions(number: int, k: int, image: ExportImage, box: ExportBox) -> list[dict]:
    """A box's rectangle and, where it has a mask, its outlines as polygons."""
    regions = [
        _region(
            f"cam{number}_{k}",
            "rectanglelabels",
            image,
            {
                "x": 100.0 * box.x_min / image.width,
                "y": 100.0 * box.y_min / image.height,
                "width": 100.0 * (box.x_max - box.x_min) / image.width,
                "height": 100.0 * (box.y_max - box.y_min) / image.height,
                "rotation": 0,
                "rectanglelabels": [box.category],
            },
            box.score,
        )
    ]
    if box.segmentation is not None:
        for j, points in enumerate(outline_points(box.segmentation, image.width, image.height)):
            regions.append(
                _region(
                    f"cam{number}_{k}_polygon{j}",
                    "polygonlabels",
                    image,
                    {"points": points, "closed": True, "polygonlabels": [box.category]},
                    box.score,
                )
            )
    return regions


def to_labelstudio(plan: ExportPlan, *, image_root: str | None = None) -> list[dict]:
    """Label Studio tasks, each with one prediction holding the image's boxes as rectangles
    (and the refined boxes' masks as polygons)."""
    tasks = []
    for number, image in enumerate(plan.images, start=1):
        source = image_url(image_root, image.file_name) if image_root else image.source_path
        result = [region for k, box in enumerate(image.boxes) for region in _box_regions(number, k, image, box)]
        prediction = {
            "model_version": (image.model_sha256 or "")[:12] or image.run_id,
            "result": result,
        }
        if image.pred_score is not None:
            prediction["score"] = image.pred_score
        tasks.append(
            {
                "id": number,
                "data": {
                    key: value
                    for key, value in (
                        ("image", source),
                        ("image_id", image.image_id),
                        ("pred_label", image.pred_label),
                        ("pred_score", image.pred_score),
                        ("label", image.label),
                        ("run_id", image.run_id),
                    )
                    if value is not None
                },
                "predictions": [prediction],
            }
        )
    return tasks


def label_config_path(tasks_path: str) -> str:
    stem = tasks_path[: -len(".json")] if tasks_path.lower().endswith(".json") else tasks_path
    return stem + LABEL_CONFIG_SUFFIX


# --------------------------------------------------------------------------- writing
@dataclass
class ExportResult:
    format: str
    paths: list[str]  # the files written (for yolo: data.yaml, manifest.csv, then the label files)
    images: int
    boxes: int
    dropped_boxes: int
    categories: list[str]
    box_source: str = "cam"
    refined_images: int = 0  # images whose boxes come from refined_boxes
    detail: str = ""  # what the format adds to the summary line (yolo: the split)

    def refined_note(self) -> str:
        """Which boxes went out, where refinement played a part: empty when none did."""
        if self.box_source == "refined":
            return (
                f"refined boxes of {self.refined_images} images, "
                f"{self.images - self.refined_images} without refinement exported with no box"
            )
        if self.box_source == "auto" and self.refined_images:
            return f"refined boxes of {self.refined_images} images, CAM boxes of {self.images - self.refined_images}"
        return ""

    def message(self) -> str:
        note = self.refined_note()
        return (
            f"{self.format}: {self.images} images, {self.boxes} boxes"
            f"{f' ({self.dropped_boxes} below --min-score dropped)' if self.dropped_boxes else ''}"
            f"{f' ({note})' if note else ''}{f' ({self.detail})' if self.detail else ''}, "
            f"categories {', '.join(self.categories)} -> {self.paths[0] if self.paths else '(nothing)'}"
        )


def _write_text(fs: pafs.FileSystem, path: str, text: str) -> None:
    parent = posixpath.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(text.encode("utf-8"))


def export(
    output: str,
    format: str,
    to: str,
    *,
    min_score: float = 0.0,
    image_root: str | None = None,
    categories: str = LESION,
    boxes: str = "auto",
    images: str = ImageMode.LINK.value,
    val_fraction: float = DEFAULT_VAL_FRACTION,
) -> ExportResult:
    """Export the newest row per image of OUTPUT/cams to `to` (a file; a directory for yolo)."""
    if format not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if format == ExportFormat.ISIC_CSV:  # probabilities, not boxes: the box options do not apply
        from camjobs.labels.isic_csv import export_isic_csv  # which imports this module

        return export_isic_csv(output, to)
    if images not in IMAGE_MODES:
        raise ExportError(f"--images must be one of {', '.join(IMAGE_MODES)}, got {images!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ExportError(f"--val-fraction must be at least 0 and below 1, got {val_fraction}")
    plan = plan_export(output, min_score=min_score, categories=categories, boxes=boxes)
    if not plan.images:
        log.warning("%s/cams holds no rows: the export is empty", output.rstrip("/"))
    elif boxes == "refined" and plan.refined_images < len(plan.images):
        log.warning(
            "--boxes refined: %d of %d images have no refined boxes (run without --refine, or nothing to "
            "refine) and are exported with no box",
            len(plan.images) - plan.refined_images,
            len(plan.images),
        )
    fs, path = open_filesystem(to)
    box_count = sum(len(image.boxes) for image in plan.images)
    paths: list[str] = []
    detail = ""
    if format == "coco":
        from camjobs.labels.coco import to_coco  # here: coco builds on this module's plan

        _write_text(fs, path, json.dumps(to_coco(plan, image_root=image_root), ensure_ascii=False, indent=1))
        paths = [to]
    elif format == "labelstudio":
        if not image_root and any("://" not in image.source_path for image in plan.images):
            log.warning(
                "no --image-root: tasks name local paths, which Label Studio cannot open from a browser; "
                "pass the URL where the dataset root is served"
            )
        _write_text(fs, path, json.dumps(to_labelstudio(plan, image_root=image_root), ensure_ascii=False, indent=1))
        config = label_config_path(path)
        polygons = any(box.segmentation is not None for image in plan.images for box in image.boxes)
        _write_text(fs, config, label_config(plan.categories, polygons=polygons))
        paths = [to, label_config_path(to)]
    else:
        from camjobs.labels.yolo import write_yolo  # here: yolo builds on this module's plan

        paths, detail = write_yolo(plan, to, images=images, val_fraction=val_fraction)
    return ExportResult(
        format,
        paths,
        len(plan.images),
        box_count,
        plan.dropped_boxes,
        list(plan.categories),
        plan.box_source,
        plan.refined_images,
        detail,
    )
