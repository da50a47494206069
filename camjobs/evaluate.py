"""Localization quality of class activation maps against lesion masks or boxes.

``evaluate_output(OUTPUT, data=... | masks=... | boxes=...)`` reads the rows of ``OUTPUT/cams``,
compares every map with the image's ground truth and writes a report (``OUTPUT/eval/`` by
default): ``metrics.json`` (the metrics below, a block per baseline, ``counts``, ``details``
with the curves, ``settings``), ``metrics.md`` (a table: metric | CAM | refined | Otsu lesion
mask | centre box | constant map), ``per_image.csv``, ``pr_curve.png`` (pixel precision-recall)
and ``box_acc.png`` (BoxAcc against the CAM threshold). The plots are drawn with OpenCV
(``camjobs.eval_plots``). ``CamEvaluator`` (``camjobs.scores``) does the same for maps held in
memory; the metric arithmetic is ``camjobs.metrics``.

Rows: with ``run_id``, that run's rows. Without, the newest run's model and settings
(``model_sha256, method, threshold, target_mode, input_size, refine``: ``schema.SETTINGS_COLUMNS``)
and every row in ``cams/`` with the same, one per image_id (the newest run's): after
``--incremental`` runs that is the whole dataset, and rows of other models or settings are left
out. Files of schema version 1 (no ``mask_rle``, ``refined_boxes``, ``refine``) are read through
``CAMS_SCHEMA``: the missing columns are null, so their rows have no refined labels and their
``refine`` setting is null, as a version-2 run without ``--refine`` writes it.

Score sources. Each thing scored is a source (``camjobs.scores``: one accumulator per source,
``add`` an image, then ``result()``); every source gets every metric below, in its own block of
metrics.json, and null where it scored no image:

- the CAM (top level of metrics.json): a score map, swept over thresholds;
- ``refined``: the labels a ``camjobs run --refine`` run wrote (see "Refined labels");
- ``otsu_baseline``: the Otsu lesion mask of the image alone (see "The Otsu baseline");
- ``centre_baseline`` and ``constant_baseline``: see "Fixed baselines".

Metrics, after Choe et al., "Evaluating Weakly Supervised Object Localization Methods Right"
(CVPR 2020) and their code (github.com/clovaai/wsolevaluation, ``evaluation.py`` and
``inference.py``). All are percentages (0-100).

Score map. The raw map (``cam``, ``cam_height`` x ``cam_width``) is upsampled bilinearly
(align_corners=False, ``camjobs.localize.upsample``) to the image's width x height and min-max
normalized to [0, 1] in float64: ``S = (U - min U) / (max U - min U)``.

Threshold sweep. ``tau`` in ``np.arange(0, 1, 0.01)`` (cam_curve_interval 0.01, 100 values).
As wsolevaluation's ``compute_bboxes_from_scoremaps``: ``Q = uint8(255 * S)`` (truncated), the
region at ``tau`` is ``Q > int(tau * max Q)``, its contours are ``cv2.findContours(RETR_TREE,
CHAIN_APPROX_SIMPLE)`` (outer borders and hole borders) and a contour's box is its
``cv2.boundingRect``.

- ``max_box_acc`` (MaxBoxAcc): for each ``tau`` the box of the largest contour (by
  ``cv2.contourArea``; of equal ones the first in findContours' list, as wsolevaluation's
  ``max()``: for separate regions, the one a raster scan meets last); BoxAcc(tau) = share of images whose box has
  IoU >= 0.5 with a ground-truth box; the maximum over ``tau``. ``details.best_threshold`` is the
  first ``tau`` that attains it.
- ``max_box_acc_v2`` (MaxBoxAccV2): every contour's box counts (multi_contour_eval): an image is
  correct at ``tau`` if any of its boxes has IoU >= delta with any ground-truth box; the maximum
  over ``tau`` for each delta in 0.3, 0.5, 0.7 (``details.box_acc_v2_by_iou``), then their mean.
- ``pxap`` (PxAP, needs masks): the values of ``S`` at mask pixels and at non-mask pixels are
  counted, pooled over all images, in the bins ``[0, .01), [.01, .02), ..., [.99, 1), [1, 2),
  [2, 3]`` (np.histogram with edges ``tau + [1, 2, 3]``). Going down the edges (2, 1, .99, ...,
  0), ``TP(e)`` and ``FP(e)`` are the mask and non-mask pixels with ``S >= e`` (reversed
  cumulative sums), precision ``TP / (TP + FP)`` (edges with ``TP + FP = 0`` are left out),
  recall ``TP / #mask pixels``, and ``PxAP = sum_k precision_k * (recall_k - recall_{k-1})``
  over consecutive edges: wsolevaluation's ``MaskEvaluator.compute``, step-wise average
  precision.
- ``gt_known_loc`` (GT-known Loc): at MaxBoxAcc's best threshold, the share of images whose
  largest-contour box has IoU >= 0.5, over the images whose map explains the ground-truth class
  (``target_label == label``; null without labels). With ``camjobs run --target label`` that is
  every labelled image and GT-known Loc equals MaxBoxAcc over them; with the default
  ``--target predicted`` it is the correctly classified images.
- ``top1_loc`` (top-1 Loc): at the same threshold, the share of labelled images that are both
  classified correctly (``pred_label == label``) and localized (IoU >= 0.5).

At the run's own threshold ``T`` (``threshold`` column, 0.2 by default), with camjobs' box rule
(``U >= T * max U``; README, "The box rule"):

- ``mean_iou``: mean IoU (x 100) of the stored ``boxes[0]`` with the ground-truth box (the best
  of several); 0 for an image without a box.
- ``iou50_share``: the share of images whose ``boxes[0]`` has IoU >= 0.5 (no box: a miss).
- ``jaccard_mean`` (needs masks): the plain mean of the Jaccard index of the whole region
  ``{U >= T * max U}`` (every component) with the mask, at the image's own size: per image
  ``J = |R & M| / |R | M|`` (``geometry.mask_jaccard``). ``details.jaccard_mean`` holds the
  same number (it was there first).
- ``jaccard_isic2018`` (needs masks): ISIC 2018 Task 1's thresholded Jaccard: per image ``J``
  if ``J >= 0.65`` else 0, averaged.

Ground truth: a lesion mask (binarized ``> 127``; ``read_mask``) gives one box, the tightest box
around all its pixels (``mask_box``), and the pixels for PxAP and the Jaccard; a COCO file gives
boxes ``[x, y, w, h]`` -> ``(x, y, x + w, y + h)`` (several per image: the best IoU counts) and no
pixels, so PxAP and the Jaccards are null. Images without ground truth, or with an empty mask or
no box, are left out and counted (``counts``). Boxes are xyxy with x_max, y_max exclusive
(camjobs' convention) and IoU is ``box_iou``.

Sources with nothing to sweep (every source but the CAM) give per image some boxes, largest
first, and a binary map. A fixed answer is the same at every threshold, so MaxBoxAcc, GT-known
and top-1 Loc use the first box as every threshold's largest-contour box, MaxBoxAccV2 counts
any of the boxes; mean IoU and the IoU >= 0.5 share use the first box; PxAP and the Jaccards use
the binary map (1 on it, 0 elsewhere; for PxAP on the sweep's grid, see difference 1: a box's
map is the grid pixels whose centre lies in it, a mask is resized like a ground-truth mask).
No box scores IoU 0, an empty map covers nothing.

Fixed baselines, under the same keys:

- ``centre_baseline``: the centre box ``centre_box(width, height, 0.5)`` (the middle half of each
  side, a quarter of the image); its binary map is the pixels whose centre lies in the box.
- ``constant_baseline``: a constant map. Every pixel is at the peak, so the region at every
  threshold is the whole image: the box is the whole image ``(0, 0, width, height)`` for the box
  metrics, and for PxAP every pixel is positive (PxAP = the share of mask pixels, pooled).
  ``CamEvaluator`` treats a constant map exactly like this (see the differences below).

The Otsu baseline (``otsu_baseline``): a lesion mask from the image's pixels alone, no model
(``camjobs.segment.otsu_lesion_mask``): at a working size of longer side at most 512 pixels
(area averaging), grey = OpenCV's RGB -> grey blurred by a Gaussian of sigma 0.01 x the longer
side; foreground = grey <= Otsu's threshold of it (lesions are darker than skin); of its
8-connected components, each scores its area, divided by 4 if it touches the image's border
(vignette corners, shadows), and the best (the first in OpenCV's label order on a tie) is the
mask, resized to the image's size. An image whose grey values are all equal has no mask. Its
box is ``mask_box`` of the mask (one component, so the box around the whole mask); no mask: no
box and an empty map. The pixels come from each row's ``source_path`` (``camjobs.decode``:
``read_bytes``, then ``decode_reduced`` with both sides kept at >= 512 where the codec can
shrink, as a JPEG can: the working image is no smaller than it would be from a full decode).
Where the file cannot be read or decoded (moved, deleted, corrupt), or now has another size
than the row's (replaced), the Otsu baseline skips that image: it is scored over the images it
could read (``counts.otsu_images``), and ``counts.image_unreadable`` and
``counts.image_size_changed`` say how many it could not. A missing file is the output's
problem, not the baseline's, so it is not scored as a miss; the CAM and the other sources
still count the image. ``image_baselines=False`` (``camjobs evaluate --no-image-baselines``)
reads no image: the Otsu baseline is null, for outputs whose images are gone.

Refined labels (``refined``): rows of a ``camjobs run --refine`` run (``refine``,
``mask_rle`` or ``refined_boxes`` not null) give their ``refined_boxes`` (largest first) as the
boxes and the mask of ``mask_rle`` (COCO RLE, ``geometry.rle_decode``) as the binary map. A
refined row with a null mask (its map was empty or flat) counts as no box and an empty mask. A
mask of another size than the image is resized (``geometry.resize_mask``;
``counts.refined_mask_resized``). Rows without refinement are left out of this source
(``counts.refined_images`` counts those in): with none, every ``refined`` metric is null.

Differences from wsolevaluation (each deliberate):

1. Resolution. wsolevaluation resizes every image, box and mask to 224 x 224. Here maps are
   compared at the image's own size, so boxes and IoUs are in original pixels. For images whose
   long side exceeds ``max_side`` (1024 by default), the sweep metrics (MaxBoxAcc, MaxBoxAccV2,
   PxAP, GT-known and top-1 Loc) use a downscaled grid of long side ``max_side`` (sizes
   rounded): the raw map is upsampled straight to that grid, the mask is resized to it with
   INTER_AREA and binarized ``> 127``, and boxes found on it are scaled back to original pixels
   before the IoU with the (full-resolution) ground-truth box. Pixels are pooled over images
   for PxAP, so larger images weigh more (wsolevaluation's fixed 224 x 224 weighs every image
   the same); the cap limits this. mean IoU and the Jaccards always use the full size.
2. Upsampling. wsolevaluation resizes the map with bicubic interpolation; here bilinear
   (align_corners=False), the rule camjobs' own heatmaps and boxes use.
3. Box extent and IoU. wsolevaluation makes the box ``(x, y, min(x + w, W - 1), min(y + h, H - 1))``
   and computes IoU with inclusive ``+1`` pixel areas, so its boxes are one pixel wider and
   taller than the contour except at the right and bottom edges. Here the box is the contour's
   exact pixel extent ``(x, y, x + w, y + h)``, max exclusive, and IoU uses plain areas.
4. No region. Where no pixel passes a threshold, wsolevaluation uses the box (0, 0, 0, 0) (one
   pixel, with its +1 convention); here there is no box and the image is not localized at that
   threshold.
5. Constant maps. wsolevaluation's ``normalize_scoremap`` turns a constant (or NaN) map into
   zeros, which has no region at any threshold. Here a constant map becomes all ones (every
   pixel is the peak), so its box is the whole image: the ``constant_baseline``. A map whose
   range is within 1e-6 of its magnitude counts as constant (upsampling a constant map in
   float32 leaves rounding noise, which min-max normalization would stretch to [0, 1]). A map with a
   non-finite value becomes zeros, as in wsolevaluation. PxAP is the same either way.
6. Masks. wsolevaluation's OpenImages masks are ``> 0.5`` after nearest resizing, have several
   instances and an ignore region; here one mask per image, ``> 127``, no ignore region.
7. Boxes from masks. wsolevaluation has ground-truth boxes (CUB, ImageNet); here, from masks,
   the one box around all of a mask's pixels.
8. GT-known Loc. In the paper the map of the ground-truth class is always available; here only
   the stored map's class (``target_label``), so GT-known Loc is over the images where that is
   the ground-truth class (see above).

per_image.csv, a row per image: ``image_id, width, height``; ``first_box_iou`` (the CAM's
``boxes[0]``) and ``jaccard`` (its region at the run's threshold); ``refined_box_iou`` and
``refined_jaccard``; ``otsu_box_iou`` and ``otsu_jaccard``; ``centre_box_iou``; ``label,
pred_label, target_label``; ``largest_box_iou_at_best_threshold`` (the CAM's largest contour at
MaxBoxAcc's threshold). A value that does not apply (no mask; a row without refinement; an
image the Otsu baseline could not read) is empty.

Memory: rows are read with the small columns first (to pick the rows), then streamed in record
batches; one image's maps and pixels are held at a time. Per image, 100 booleans (the
largest-contour hits at IoU 0.5, for GT-known and top-1 Loc at the best threshold, found at
the end) and a few numbers per source are kept.

This module must not import torch or ray (tests and label tools import ``mask_box`` from it);
maps are upsampled by ``camjobs.localize``, which needs neither.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from dataclasses import dataclass, field
from typing import Any, Iterable

import cv2
import numpy as np

from camjobs.eval_plots import draw_box_acc_plot, draw_pr_plot, encode_png, fmt
from camjobs.geometry import mask_box, rle_decode
from camjobs.metrics import pr_curve
from camjobs.schema import CAMS_SCHEMA, SETTINGS_COLUMNS
from camjobs.scores import (  # noqa: F401 (CamEvaluator and its types are this module's API too)
    DEFAULT_MAX_SIDE,
    DEFAULT_THRESHOLD,
    METRIC_KEYS,
    CamEvaluator,
    EvaluationError,
    GroundTruth,
    Refinement,
    source_blocks,
)
from camjobs.segment import WORK_SIDE

MASK_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_SUFFIX = "_segmentation"
IMAGE_MIN_SIDE = WORK_SIDE  # the image baselines decode with both sides at least this (the Otsu working size)
METRIC_NAMES = {
    "max_box_acc": "MaxBoxAcc (IoU 0.5, largest contour)",
    "max_box_acc_v2": "MaxBoxAccV2 (IoU 0.3/0.5/0.7, all contours)",
    "pxap": "PxAP (pixel average precision)",
    "top1_loc": "Top-1 Loc (IoU 0.5, at MaxBoxAcc's threshold)",
    "gt_known_loc": "GT-known Loc (IoU 0.5, at MaxBoxAcc's threshold)",
    "mean_iou": "mean IoU of boxes[0] (x100, run threshold)",
    "iou50_share": "share with IoU >= 0.5 of boxes[0] (run threshold)",
    "jaccard_mean": "mean Jaccard (run threshold)",
    "jaccard_isic2018": "ISIC 2018 thresholded Jaccard (run threshold)",
}


# --------------------------------------------------------------------------- boxes and masks
def read_mask(path: str) -> np.ndarray:
    """A lesion mask as bool; masks resized with interpolation hold grey edges, so > 127."""
    mask = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError(f"could not read mask {path}")
    return mask > 127


# --------------------------------------------------------------------------- ground truth sources
def _read_bytes(path: str) -> bytes:
    from camjobs.storage import open_filesystem

    fs, inner = open_filesystem(path)
    with fs.open_input_file(inner) as stream:
        return stream.read()


def load_mask(path: str) -> np.ndarray:
    """read_mask for a local path or a URI (s3://, gs://, file://)."""
    if "://" not in path:
        return read_mask(path)
    mask = cv2.imdecode(np.frombuffer(_read_bytes(path), np.uint8), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError(f"could not read mask {path}")
    return mask > 127


def _strip_ext(name: str) -> str:
    stem, ext = posixpath.splitext(name)
    return stem if ext else name


def _add_keys(index: dict[str, Any], ambiguous: set[str], keys: Iterable[str], value: Any) -> None:
    for key in dict.fromkeys(keys):
        if key in index and index[key] is not value:
            ambiguous.add(key)
        else:
            index.setdefault(key, value)


def index_mask_folder(folder: str) -> dict[str, str]:
    """image_id -> mask path for a folder of ``<id>_segmentation.png`` or ``<id>.png`` files.

    Keys: the path relative to the folder without extension (and without ``_segmentation``),
    and the file name alone when no other file has the same; ``_segmentation`` files win.
    """
    import pyarrow.fs as pafs

    from camjobs.storage import open_filesystem

    fs, root = open_filesystem(folder.rstrip("/") or "/")
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise EvaluationError(f"mask folder {folder!r} does not exist")
    scheme = folder.split("://", 1)[0] + "://" if "://" in folder else ""
    found = []
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        relative = info.path[len(root.rstrip("/")) + 1:]
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


@dataclass
class CocoImage:
    boxes: list[tuple[float, float, float, float]]
    width: float | None
    height: float | None


def load_coco_boxes(path: str) -> dict[str, CocoImage]:
    """image key -> boxes from a COCO json (``bbox`` [x, y, w, h] -> xyxy).

    Keys: ``file_name`` without extension, its base name (when unique) and ``str(id)``.
    """
    try:
        data = json.loads(_read_bytes(path) if "://" in path else open(path, "rb").read())
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"cannot read COCO boxes {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
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
            entry.boxes.append((x, y, x + w, y + h))
    return index


class _TruthSource:
    """Ground truth for an image_id from a dataset, a mask folder or a COCO file."""

    def __init__(self, data: str | None, masks: str | None, boxes: str | None):
        given = [name for name, value in (("data", data), ("masks", masks), ("boxes", boxes)) if value]
        if len(given) != 1:
            raise EvaluationError("give exactly one source of ground truth: data (--data, a dataset with masks), "
                                  "masks (--masks, a folder of masks) or boxes (--boxes, a COCO json)")
        self.masks: dict[str, str] = {}
        self.coco: dict[str, CocoImage] | None = None
        if data:
            from camjobs.layouts import LayoutError, list_images

            try:
                listing = list_images(data)
            except LayoutError as exc:
                raise EvaluationError(str(exc)) from exc
            self.masks = {r.image_id: r.mask_path for r in listing.records if r.mask_path}
            if not self.masks:
                raise EvaluationError(f"{data} ({listing.layout} layout) has no lesion masks; give masks= or boxes=")
            self.description = f"masks of the {listing.layout} dataset {data}"
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
        mask = load_mask(path)
        if mask.shape != (height, width):
            mask = cv2.resize(mask.astype(np.uint8) * 255, (width, height), interpolation=cv2.INTER_NEAREST) > 127
            self.counts["mask_resized"] += 1
        box = mask_box(mask)
        return GroundTruth([box] if box else [], mask)


# --------------------------------------------------------------------------- reading the output
_LIGHT = ("image_id", "run_id", *SETTINGS_COLUMNS)
_HEAVY = ("image_id", "run_id", "source_path", "width", "height", "cam", "cam_height", "cam_width", "boxes",
          "threshold", "label", "pred_label", "target_label", "mask_rle", "refined_boxes", "refine")


def _select_rows(dataset, run_id: str | None) -> tuple[set[tuple[str, str]], list[str]]:
    """(run_id, image_id) pairs to evaluate, and the runs they come from.

    With run_id: that run's rows. Without: the newest run's model and settings
    (schema.SETTINGS_COLUMNS), every row with them, one per image (newest run).
    """
    import pandas as pd

    names = set(dataset.schema.names)
    columns = [c for c in _LIGHT if c in names]
    table = dataset.to_table(columns=columns).to_pandas()
    if table.empty:
        raise EvaluationError("no rows in cams/")
    runs = sorted(table["run_id"].dropna().unique())
    if run_id is not None:
        if run_id not in runs:
            raise EvaluationError(f"no rows of run {run_id!r} in cams/; runs: {', '.join(runs)}")
        table = table[table["run_id"] == run_id]
    else:
        settings = [c for c in columns if c not in ("image_id", "run_id")]
        # compared as text, every value converted by str(), so that nulls match nulls
        keys = pd.Series(["|".join(map(str, values)) for values in table[settings].itertuples(index=False)],
                         index=table.index, dtype=object)
        newest = keys[table["run_id"] == runs[-1]].iloc[0]
        table = table[keys == newest]
    table = table.sort_values("run_id").drop_duplicates("image_id", keep="last")
    return set(zip(table["run_id"], table["image_id"])), sorted(table["run_id"].unique())


def _open_cams(output: str):
    """The cams/ rows as a dataset of CAMS_SCHEMA: version-1 files read with nulls in the new columns."""
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    from camjobs.storage import open_filesystem

    fs, root = open_filesystem(output.rstrip("/"))
    cams = f"{root}/cams"
    if fs.get_file_info(cams).type != pafs.FileType.Directory:
        raise EvaluationError(f"{output}: no cams/ folder (not a camjobs output?)")
    return pads.dataset(cams, schema=CAMS_SCHEMA, filesystem=fs, format="parquet", exclude_invalid_files=False)


def _box(box: dict) -> tuple[float, float, float, float]:
    return float(box["x_min"]), float(box["y_min"]), float(box["x_max"]), float(box["y_max"])


def _first_box(boxes) -> tuple[float, float, float, float] | None:
    return _box(boxes[0]) if boxes else None


def _refinement(row: dict[str, Any]) -> Refinement | None:
    """A --refine row's refined_boxes and decoded mask_rle; None for a row without refinement."""
    rle, boxes = row.get("mask_rle"), row.get("refined_boxes")
    if row.get("refine") is None and rle is None and boxes is None:
        return None
    return Refinement([_box(b) for b in boxes or []], rle_decode(rle) if rle else None)


class _ImageReader:
    """Each row's image, decoded at a reduced size, for the image baselines; None where it is gone."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.counts = {"image_unreadable": 0, "image_size_changed": 0}

    def read(self, source_path: str | None, width: int, height: int) -> np.ndarray | None:
        """RGB pixels of a width x height image; None (counted) if unreadable or now another size."""
        from camjobs.decode import ImageInputError, decode_reduced, read_bytes

        if not self.enabled:
            return None
        try:
            if not source_path:
                raise ImageInputError("missing_file", "the row has no source_path")
            rgb, read_width, read_height = decode_reduced(read_bytes(source_path), IMAGE_MIN_SIDE, source=source_path)
        except (ImageInputError, OSError, ValueError):
            self.counts["image_unreadable"] += 1
            return None
        if (read_width, read_height) != (width, height):
            self.counts["image_size_changed"] += 1
            return None
        return rgb


# --------------------------------------------------------------------------- report
@dataclass
class EvaluationReport:
    metrics: dict[str, Any]  # the content of metrics.json
    report_dir: str | None = None  # where the files were written (None: not written)
    files: dict[str, str] = field(default_factory=dict)  # file name -> path

    def __getitem__(self, key: str) -> Any:
        return self.metrics[key]

    def table(self) -> str:
        return markdown_table(self.metrics)


def markdown_table(metrics: dict[str, Any]) -> str:
    """metric | CAM | each other source, in percent (n/a where a metric does not apply)."""
    blocks = source_blocks(metrics)
    lines = ["| metric | " + " | ".join(title for _, title, _ in blocks) + " |",
             "| --- |" + " ---: |" * len(blocks)]
    for key in METRIC_KEYS:
        lines.append(f"| {METRIC_NAMES[key]} | " + " | ".join(fmt(block[key]) for _, _, block in blocks) + " |")
    return "\n".join(lines)


def _image_baseline_note(counts: dict[str, Any], settings: dict[str, Any]) -> str:
    if not settings.get("image_baselines", True):
        return "off (--no-image-baselines): no image was read"
    unread = counts.get("image_unreadable", 0) + counts.get("image_size_changed", 0)
    return f"over the {counts.get('otsu_images', 0)} images read ({unread} unreadable or changed, left out)"


def markdown_report(metrics: dict[str, Any]) -> str:
    details, counts, settings = metrics["details"], metrics["counts"], metrics["settings"]
    by_iou = ", ".join(f"IoU {k}: {v:.2f}" for k, v in details["box_acc_v2_by_iou"].items())
    run_thresholds = ", ".join(f"{t:g}" for t in settings["run_thresholds"])
    lines = [
        "# Localization of the class activation maps",
        "",
        f"Output `{settings.get('output', '')}`, run(s) {', '.join(settings.get('runs', [])) or 'n/a'}; "
        f"ground truth: {settings.get('ground_truth', 'n/a')}.",
        f"{counts['evaluated']} images evaluated ({counts['with_mask']} with masks).",
        "",
        markdown_table(metrics),
        "",
        "All numbers are percentages. mean IoU is 100 x the mean IoU.",
        "",
        f"- MaxBoxAcc's best CAM threshold: {details['best_threshold']:.2f}; GT-known and top-1 Loc use it.",
        f"- MaxBoxAccV2 by IoU: {by_iou}.",
        f"- Run threshold(s) for the CAM's boxes[0] and Jaccard region: {run_thresholds}.",
        "- Sweep: CAM thresholds 0, 0.01, ..., 0.99 on the min-max normalized map (Choe et al., CVPR 2020).",
        "- The other sources have nothing to sweep: their boxes count at every threshold, their binary map "
        "for PxAP and the Jaccard.",
        f"- refined: refined_boxes and the mask_rle mask of a --refine run ({counts.get('refined_images', 0)} images; "
        "n/a without --refine).",
        f"- Otsu lesion mask: the image-only baseline (camjobs.segment.otsu_lesion_mask), "
        f"{_image_baseline_note(counts, settings)}.",
        "- centre box: the middle half of each side.",
        "- constant map: the whole image as the box at every threshold; every pixel positive for PxAP.",
        "- top-1 Loc counts labelled images; GT-known Loc the images whose map explains the ground-truth class.",
        "",
        "Counts: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ".",
        "",
        "Plots: `pr_curve.png` (pixel precision-recall), `box_acc.png` (BoxAcc against the CAM threshold).",
        "",
    ]
    return "\n".join(lines)


def write_report(metrics: dict[str, Any], per_image: list[dict[str, Any]], report_dir: str) -> dict[str, str]:
    """Write metrics.json, metrics.md, per_image.csv and the two PNG plots; name -> path."""
    from camjobs.storage import open_filesystem

    fs, root = open_filesystem(report_dir.rstrip("/") or "/")
    fs.create_dir(root, recursive=True)
    text = io.StringIO()
    if per_image:
        writer = csv.DictWriter(text, fieldnames=list(per_image[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(per_image)
    contents = {
        "metrics.json": json.dumps(metrics, indent=2, allow_nan=False).encode(),
        "metrics.md": markdown_report(metrics).encode(),
        "per_image.csv": text.getvalue().encode(),
        "pr_curve.png": encode_png(draw_pr_plot(metrics)),
        "box_acc.png": encode_png(draw_box_acc_plot(metrics)),
    }
    files = {}
    for name, payload in contents.items():
        path = f"{root.rstrip('/')}/{name}"
        with fs.open_output_stream(path) as stream:
            stream.write(payload)
        files[name] = path if "://" not in report_dir else f"{report_dir.rstrip('/')}/{name}"
    return files


# --------------------------------------------------------------------------- the entry point
def _add_row(evaluator: CamEvaluator, row: dict[str, Any], truth: GroundTruth, images: _ImageReader) -> None:
    """One cams row into the evaluator: its map, boxes[0], refined labels and (read now) pixels."""
    width, height = int(row["width"]), int(row["height"])
    cam = np.asarray(row["cam"], dtype=np.float32).reshape(int(row["cam_height"]), int(row["cam_width"]))
    threshold = row.get("threshold")
    evaluator.add(
        cam, width, height, truth,
        threshold=DEFAULT_THRESHOLD if threshold is None else float(threshold),
        first_box=_first_box(row.get("boxes")),
        label=row.get("label"), pred_label=row.get("pred_label"), target_label=row.get("target_label"),
        image_id=row["image_id"],
        refined=_refinement(row),
        rgb=images.read(row.get("source_path"), width, height),
    )


def evaluate_output(
    output_dir: str,
    *,
    data: str | None = None,
    masks: str | None = None,
    boxes: str | None = None,
    run_id: str | None = None,
    report_dir: str | None = None,
    max_side: int | None = DEFAULT_MAX_SIDE,
    write: bool = True,
    progress: bool = False,
    image_baselines: bool = True,
) -> EvaluationReport:
    """Evaluate the maps in ``output_dir/cams`` against one source of ground truth.

    data: a dataset with lesion masks (camjobs.layouts; ham10000, isic2017, isic2018); masks: a
    folder of ``<image_id>_segmentation.png`` or ``<image_id>.png``; boxes: a COCO json. Rows:
    ``run_id``'s, or by default the newest run's model and settings over every run (one row per
    image, the newest). Writes the report to ``report_dir`` (default ``output_dir/eval``) unless
    ``write`` is False. ``image_baselines``: read each row's image for the Otsu baseline (False
    for outputs whose images are gone). Raises EvaluationError when there is nothing to evaluate.
    """
    import pyarrow.compute as pc
    from tqdm import tqdm

    dataset = _open_cams(output_dir)
    selected, runs = _select_rows(dataset, run_id)
    truth_source = _TruthSource(data, masks, boxes)
    evaluator = CamEvaluator(max_side=max_side)
    images = _ImageReader(image_baselines)
    skipped = {"no_ground_truth": 0, "empty_ground_truth": 0}
    names = set(dataset.schema.names)
    columns = [c for c in _HEAVY if c in names]
    done: set[tuple[str, str]] = set()
    bar = tqdm(total=len(selected), desc="evaluate", unit="img", disable=not progress)
    for batch in dataset.to_batches(columns=columns, filter=pc.field("run_id").isin(runs), batch_size=256):
        for row in batch.to_pylist():
            key = (row["run_id"], row["image_id"])
            if key not in selected or key in done:
                continue
            done.add(key)
            bar.update(1)
            width, height = int(row["width"]), int(row["height"])
            truth = truth_source.lookup(row["image_id"], width, height)
            if truth is None:
                skipped["no_ground_truth"] += 1
                continue
            if not truth.boxes:
                skipped["empty_ground_truth"] += 1
                continue
            _add_row(evaluator, row, truth, images)
    bar.close()
    if not evaluator.images:
        raise EvaluationError(
            f"none of the {len(selected)} images has ground truth in {truth_source.description} "
            f"({skipped['no_ground_truth']} without, {skipped['empty_ground_truth']} empty)"
        )
    metrics = evaluator.result()
    metrics["counts"] = {"images": len(selected), **metrics["counts"], **skipped, **truth_source.counts, **images.counts}
    metrics["settings"].update({"output": output_dir, "runs": runs, "ground_truth": truth_source.description,
                                "image_baselines": image_baselines})
    report = EvaluationReport(metrics)
    if write:
        report.report_dir = report_dir or f"{output_dir.rstrip('/')}/eval"
        report.files = write_report(metrics, evaluator.per_image, report.report_dir)
    return report
