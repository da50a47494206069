"""Localization quality of class activation maps against lesion masks or boxes.

``evaluate_output(OUTPUT, data=... | masks=... | boxes=...)`` reads the rows of ``OUTPUT/cams``,
compares every map with the image's ground truth and writes a report (``OUTPUT/eval/`` by
default): ``metrics.json`` (the metrics below, their baselines, ``counts``, ``details`` with the
curves, ``settings``), ``metrics.md`` (a table: metric | CAM | centre box | constant map),
``per_image.csv`` (per image: IoU of ``boxes[0]`` and of the centre box, Jaccard, labels, IoU of
the largest-contour box at MaxBoxAcc's threshold), ``pr_curve.png`` (pixel precision-recall) and
``box_acc.png`` (BoxAcc against the CAM threshold). The plots are drawn with OpenCV.
``CamEvaluator`` does the same for maps held in memory.

Rows: with ``run_id``, that run's rows. Without, the newest run's model and settings
(``model_sha256, method, threshold, target_mode, input_size``) and every row in ``cams/`` with
the same, one per image_id (the newest run's): after ``--incremental`` runs that is the whole
dataset, and rows of other models or settings are left out.

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
- ``jaccard_isic2018`` (needs masks): ISIC 2018 Task 1's thresholded Jaccard of the whole
  region ``{U >= T * max U}`` (every component) with the mask, at the image's own size: per
  image ``J = |R & M| / |R | M|``, scored ``J`` if ``J >= 0.65`` else 0, averaged.
  ``details.jaccard_mean`` is the plain mean of ``J``.

Ground truth: a lesion mask (binarized ``> 127``; ``read_mask``) gives one box, the tightest box
around all its pixels (``mask_box``), and the pixels for PxAP and the Jaccard; a COCO file gives
boxes ``[x, y, w, h]`` -> ``(x, y, x + w, y + h)`` (several per image: the best IoU counts) and no
pixels, so PxAP and the Jaccard are null. Images without ground truth, or with an empty mask or
no box, are left out and counted (``counts``). Boxes are xyxy with x_max, y_max exclusive
(camjobs' convention) and IoU is ``box_iou``.

Baselines, under the same keys:

- ``centre_baseline``: the centre box ``centre_box(width, height, 0.5)`` (the middle half of each
  side, a quarter of the image). A fixed box is the same at every threshold, so MaxBoxAcc(V2),
  GT-known and top-1 Loc use it as every threshold's only box; mean IoU uses it as ``boxes[0]``;
  PxAP and the Jaccard use it as a binary map (1 at pixels whose centre lies in the box, else 0).
- ``constant_baseline``: a constant map. Every pixel is at the peak, so the region at every
  threshold is the whole image: the box is the whole image ``(0, 0, width, height)`` for the box
  metrics, and for PxAP every pixel is positive (PxAP = the share of mask pixels, pooled).
  ``CamEvaluator`` treats a constant map exactly like this (see the differences below).

Differences from wsolevaluation (each deliberate):

1. Resolution. wsolevaluation resizes every image, box and mask to 224 x 224. Here maps are
   compared at the image's own size, so boxes and IoUs are in original pixels. For images whose
   long side exceeds ``max_side`` (1024 by default), the sweep metrics (MaxBoxAcc, MaxBoxAccV2,
   PxAP, GT-known and top-1 Loc) use a downscaled grid of long side ``max_side`` (sizes
   rounded): the raw map is upsampled straight to that grid, the mask is resized to it with
   INTER_AREA and binarized ``> 127``, and boxes found on it are scaled back to original pixels
   before the IoU with the (full-resolution) ground-truth box. Pixels are pooled over images
   for PxAP, so larger images weigh more (wsolevaluation's fixed 224 x 224 weighs every image
   the same); the cap limits this. mean IoU and the Jaccard always use the full size.
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

Memory: rows are read with the small columns first (to pick the rows), then streamed in record
batches; one image's maps are held at a time. Per image, 100 booleans (the largest-contour hits
at IoU 0.5, for GT-known and top-1 Loc at the best threshold, found at the end) and a few
numbers are kept.

This module must not import torch or ray (``camjobs.synth`` imports ``mask_box`` from it);
maps are upsampled by ``camjobs.localize``, which needs neither.
"""

from __future__ import annotations

import csv
import io
import json
import math
import posixpath
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import cv2
import numpy as np

from camjobs.geometry import Box, box_iou, centre_box, mask_box

CAM_CURVE_INTERVAL = 0.01
CAM_THRESHOLDS = np.arange(0, 1, CAM_CURVE_INTERVAL)  # the sweep, as wsolevaluation builds it
IOU_THRESHOLDS = (0.3, 0.5, 0.7)  # MaxBoxAccV2
MAX_BOX_ACC_IOU = 0.5  # MaxBoxAcc, GT-known and top-1 Loc
PXAP_EDGES = np.append(CAM_THRESHOLDS, [1.0, 2.0, 3.0])  # histogram bin edges for PxAP
ISIC_JACCARD_CUTOFF = 0.65  # ISIC 2018 Task 1: per-image Jaccard below this scores 0
DEFAULT_MAX_SIDE = 1024
CONSTANT_RTOL = 1e-6  # a map whose range is below this fraction of its magnitude is constant
DEFAULT_THRESHOLD = 0.2
MASK_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_SUFFIX = "_segmentation"
METRIC_KEYS = ("max_box_acc", "max_box_acc_v2", "pxap", "top1_loc", "gt_known_loc", "mean_iou", "jaccard_isic2018")
METRIC_NAMES = {
    "max_box_acc": "MaxBoxAcc (IoU 0.5, largest contour)",
    "max_box_acc_v2": "MaxBoxAccV2 (IoU 0.3/0.5/0.7, all contours)",
    "pxap": "PxAP (pixel average precision)",
    "top1_loc": "Top-1 Loc (IoU 0.5, at MaxBoxAcc's threshold)",
    "gt_known_loc": "GT-known Loc (IoU 0.5, at MaxBoxAcc's threshold)",
    "mean_iou": "mean IoU of boxes[0] (x100, run threshold)",
    "jaccard_isic2018": "ISIC 2018 thresholded Jaccard (run threshold)",
}


class EvaluationError(ValueError):
    """The output, the ground truth or the options do not allow an evaluation."""


# --------------------------------------------------------------------------- boxes and masks
def read_mask(path: str) -> np.ndarray:
    """A lesion mask as bool; masks resized with interpolation hold grey edges, so > 127."""
    mask = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError(f"could not read mask {path}")
    return mask > 127


def best_ious(boxes: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """For each of n xyxy boxes, its best IoU (``box_iou``) with any of m ground-truth boxes."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[:, None, :]
    truth = np.asarray(truth, dtype=np.float64).reshape(-1, 4)[None, :, :]
    width = np.maximum(0.0, np.minimum(boxes[..., 2], truth[..., 2]) - np.maximum(boxes[..., 0], truth[..., 0]))
    height = np.maximum(0.0, np.minimum(boxes[..., 3], truth[..., 3]) - np.maximum(boxes[..., 1], truth[..., 1]))
    intersection = width * height
    union = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
             + (truth[..., 2] - truth[..., 0]) * (truth[..., 3] - truth[..., 1]) - intersection)
    iou = np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)
    return iou.max(axis=1) if iou.shape[1] else np.zeros(iou.shape[0])


def box_region(box: Box, width: int, height: int, grid_width: int | None = None, grid_height: int | None = None) -> np.ndarray:
    """Pixels of a grid_height x grid_width grid over a width x height image whose centres lie in box."""
    grid_width, grid_height = grid_width or width, grid_height or height
    xs = (np.arange(grid_width) + 0.5) * (width / grid_width)
    ys = (np.arange(grid_height) + 0.5) * (height / grid_height)
    inside_x = (xs >= box[0]) & (xs < box[2])
    inside_y = (ys >= box[1]) & (ys < box[3])
    return inside_y[:, None] & inside_x[None, :]


# --------------------------------------------------------------------------- score maps
def normalize_scoremap(upsampled: np.ndarray) -> np.ndarray:
    """Min-max normalization to [0, 1] in float64; a constant map -> ones, non-finite -> zeros.

    A map whose range is within 1e-6 of its magnitude counts as constant: upsampling a constant
    map in float32 leaves rounding noise that min-max normalization would blow up to [0, 1].
    """
    scoremap = np.asarray(upsampled, dtype=np.float64)
    if not np.isfinite(scoremap).all():
        return np.zeros_like(scoremap)
    low, high = scoremap.min(), scoremap.max()
    if high - low <= CONSTANT_RTOL * max(abs(low), abs(high)):
        return np.ones_like(scoremap)
    return (scoremap - low) / (high - low)


@dataclass
class SweepStep:
    """The contours' boxes at one threshold (xyxy, max exclusive) and which one is the largest."""

    boxes: np.ndarray  # (n, 4) int
    largest: int


def contour_boxes(scoremap: np.ndarray, thresholds: Iterable[float] = CAM_THRESHOLDS) -> list[SweepStep | None]:
    """wsolevaluation's boxes per threshold (None where no pixel passes); see the module docstring."""
    quantized = (np.asarray(scoremap) * 255).astype(np.uint8)
    peak = int(quantized.max())
    # at_least[v] = pixels with Q >= v: regions are nested, so an equal count above two cuts
    # means the same region (maps with few distinct values skip most findContours calls).
    at_least = np.append(np.cumsum(np.bincount(quantized.ravel(), minlength=256)[::-1])[::-1], 0)
    steps: list[SweepStep | None] = []
    last_count, last_step = -1, None
    for threshold in thresholds:
        cut = int(threshold * peak)
        count = int(at_least[cut + 1])
        if count != last_count:
            last_count, last_step = count, None
            if count:
                region = (quantized > cut).astype(np.uint8)
                contours = cv2.findContours(region, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
                if contours:
                    rects = np.array([cv2.boundingRect(c) for c in contours], dtype=np.int64).reshape(-1, 4)
                    rects[:, 2:] += rects[:, :2]
                    areas = [cv2.contourArea(c) for c in contours]
                    last_step = SweepStep(rects, int(np.argmax(areas)))
        steps.append(last_step)
    return steps


def pixel_histograms(scoremap: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts of the scoremap's values at mask and non-mask pixels in the PxAP bins.

    The bins of np.histogram(values, PXAP_EDGES): [e_i, e_i+1), the last one closed.
    """
    size = len(PXAP_EDGES) - 1
    bins = np.searchsorted(PXAP_EDGES, np.asarray(scoremap, dtype=np.float64).ravel(), side="right") - 1
    np.clip(bins, 0, size - 1, out=bins)
    bins += size * np.asarray(mask, dtype=bool).ravel()
    counts = np.bincount(bins, minlength=2 * size).astype(np.float64)
    return counts[size:], counts[:size]


def _binary_histograms(region: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pixel_histograms of a map that is 1 on region and 0 elsewhere."""
    size = len(PXAP_EDGES) - 1
    top = int(np.searchsorted(PXAP_EDGES, 1.0, side="right")) - 1  # the bin [1, 2)
    positive, negative = np.zeros(size), np.zeros(size)
    mask_pixels, hits = int(np.count_nonzero(mask)), int(np.count_nonzero(region & mask))
    region_pixels = int(np.count_nonzero(region))
    positive[top], positive[0] = hits, mask_pixels - hits
    negative[top], negative[0] = region_pixels - hits, mask.size - mask_pixels - (region_pixels - hits)
    return positive, negative


@dataclass
class PrCurve:
    pxap: float | None  # percent; None without mask pixels
    thresholds: np.ndarray  # the edges, descending (2, 1, .99, ..., 0), where precision is defined
    precision: np.ndarray
    recall: np.ndarray


def pr_curve(positive_hist: np.ndarray, negative_hist: np.ndarray) -> PrCurve:
    """The pixel precision-recall curve and its area (PxAP), as wsolevaluation's MaskEvaluator."""
    tp = np.cumsum(positive_hist[::-1])
    fp = np.cumsum(negative_hist[::-1])
    edges = PXAP_EDGES[:-1][::-1]
    positives = float(positive_hist.sum())
    defined = (tp + fp) > 0
    if positives <= 0:
        return PrCurve(None, edges[defined], np.zeros(int(defined.sum())), np.zeros(int(defined.sum())))
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=defined)
    recall = tp / positives
    area = float((precision[1:] * np.diff(recall))[defined[1:]].sum())
    return PrCurve(100.0 * area, edges[defined], precision[defined], recall[defined])


def run_region(upsampled: np.ndarray, threshold: float) -> np.ndarray:
    """camjobs' box rule on an upsampled map: clip(U / max U, 0, 1) >= T; empty when max U <= 0.

    In float32, as ``camjobs.localize.normalized`` computes it, so it is the region the run's
    boxes were drawn from.
    """
    upsampled = np.asarray(upsampled, dtype=np.float32)
    peak = upsampled.max()
    if not np.isfinite(peak) or peak <= 0:
        return np.zeros(upsampled.shape, bool)
    return np.clip(upsampled / peak, 0.0, 1.0) >= np.float32(threshold)


def isic_jaccard(region: np.ndarray, mask: np.ndarray) -> float:
    """Jaccard index of two boolean maps (1.0 when both are empty)."""
    union = int(np.count_nonzero(region | mask))
    return int(np.count_nonzero(region & mask)) / union if union else 1.0


# --------------------------------------------------------------------------- the evaluator
@dataclass
class GroundTruth:
    boxes: list[tuple[float, float, float, float]]  # xyxy, max exclusive, original pixels
    mask: np.ndarray | None = None  # bool, height x width


def eval_grid(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """The (width, height) the sweep metrics use: the image's, or scaled to long side max_side."""
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _percent(hits: float, total: int) -> float | None:
    return 100.0 * hits / total if total else None


class CamEvaluator:
    """Accumulates one image at a time; ``result()`` gives metrics.json's content."""

    def __init__(self, max_side: int | None = DEFAULT_MAX_SIDE):
        self.max_side = max_side
        n_thr, n_bins = len(CAM_THRESHOLDS), len(PXAP_EDGES) - 1
        self.largest_hits = {iou: np.zeros(n_thr) for iou in IOU_THRESHOLDS}
        self.any_hits = {iou: np.zeros(n_thr) for iou in IOU_THRESHOLDS}
        self.hist = {name: (np.zeros(n_bins), np.zeros(n_bins)) for name in ("cam", "centre", "constant")}
        self.fixed_hits = {name: {iou: 0 for iou in IOU_THRESHOLDS} for name in ("centre", "constant")}
        self.iou_sum = {"cam": 0.0, "centre": 0.0, "constant": 0.0}
        self.jaccards: dict[str, list[float]] = {"cam": [], "centre": [], "constant": []}
        self.images = 0
        self.thresholds: set[float] = set()
        self.counts = {"evaluated": 0, "with_mask": 0, "labelled": 0, "gt_known_images": 0,
                       "downscaled": 0, "no_box_at_run_threshold": 0}
        # per image, for GT-known / top-1 Loc at the best threshold and per_image.csv
        self._hits50: list[np.ndarray] = []
        self._largest_iou: list[np.ndarray] = []
        self._labels: list[tuple[bool, bool]] = []  # (labelled and predicted right, map of the GT class)
        self._labelled: list[bool] = []
        self._fixed50: dict[str, list[bool]] = {"centre": [], "constant": []}
        self.per_image: list[dict[str, Any]] = []

    # ----------------------------------------------------------------------- one image
    def add(
        self,
        cam: np.ndarray,
        width: int,
        height: int,
        truth: GroundTruth,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        first_box: Box | None = None,
        label: str | None = None,
        pred_label: str | None = None,
        target_label: str | None = None,
        image_id: str = "",
    ) -> None:
        """Add one raw map (cam_height x cam_width) of a width x height image with its ground truth.

        ``first_box`` is the run's ``boxes[0]`` (None: the run found no box) at ``threshold``.
        """
        from camjobs.localize import upsample

        if not truth.boxes:
            raise ValueError("ground truth without a box")
        width, height = int(width), int(height)
        truth_boxes = np.asarray(truth.boxes, dtype=np.float64).reshape(-1, 4)
        raw = np.ascontiguousarray(cam, dtype=np.float32)
        grid_w, grid_h = eval_grid(width, height, self.max_side)
        downscaled = (grid_w, grid_h) != (width, height)
        upsampled = upsample(raw, grid_h, grid_w)
        scoremap = normalize_scoremap(upsampled)

        # sweep: boxes per threshold, back in original pixels
        scale = np.array([width / grid_w, height / grid_h, width / grid_w, height / grid_h])
        largest_iou = np.zeros(len(CAM_THRESHOLDS))
        any_iou = np.zeros(len(CAM_THRESHOLDS))
        cache: dict[int, tuple[float, float]] = {}
        for index, step in enumerate(contour_boxes(scoremap)):
            if step is None:
                continue
            key = id(step)
            if key not in cache:
                boxes = step.boxes * scale if downscaled else step.boxes.astype(np.float64)
                ious = best_ious(boxes, truth_boxes)
                cache[key] = (float(ious[step.largest]), float(ious.max()))
            largest_iou[index], any_iou[index] = cache[key]
        for iou in IOU_THRESHOLDS:
            self.largest_hits[iou] += largest_iou >= iou
            self.any_hits[iou] += any_iou >= iou
        hits50 = largest_iou >= MAX_BOX_ACC_IOU

        fixed = {"centre": centre_box(width, height, 0.5), "constant": (0.0, 0.0, float(width), float(height))}
        fixed_iou = {name: float(best_ious(np.array([box]), truth_boxes)[0]) for name, box in fixed.items()}
        for name, value in fixed_iou.items():
            for iou in IOU_THRESHOLDS:
                self.fixed_hits[name][iou] += value >= iou
            self._fixed50[name].append(value >= MAX_BOX_ACC_IOU)

        # the run's own threshold: boxes[0] and the region U >= T * max U
        first_iou = float(best_ious(np.array([first_box], dtype=np.float64), truth_boxes)[0]) if first_box is not None else 0.0
        self.iou_sum["cam"] += first_iou
        self.iou_sum["centre"] += fixed_iou["centre"]
        self.iou_sum["constant"] += fixed_iou["constant"]
        self.counts["no_box_at_run_threshold"] += first_box is None
        self.thresholds.add(round(float(threshold), 6))

        jaccard = None
        if truth.mask is not None:
            mask = np.asarray(truth.mask, dtype=bool)
            if mask.shape != (height, width):
                raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]}, image {width}x{height}")
            grid_mask = mask if not downscaled else cv2.resize(
                mask.astype(np.uint8) * 255, (grid_w, grid_h), interpolation=cv2.INTER_AREA) > 127
            for name, (pos, neg) in (
                ("cam", pixel_histograms(scoremap, grid_mask)),
                ("centre", _binary_histograms(box_region(fixed["centre"], width, height, grid_w, grid_h), grid_mask)),
                ("constant", _binary_histograms(np.ones(grid_mask.shape, bool), grid_mask)),
            ):
                self.hist[name][0][:] += pos
                self.hist[name][1][:] += neg
            full = upsampled if not downscaled else upsample(raw, height, width)
            jaccard = isic_jaccard(run_region(full, threshold), mask)
            self.jaccards["cam"].append(jaccard)
            self.jaccards["centre"].append(isic_jaccard(box_region(fixed["centre"], width, height), mask))
            self.jaccards["constant"].append(float(np.count_nonzero(mask)) / mask.size)
            self.counts["with_mask"] += 1

        labelled = label is not None
        self._hits50.append(hits50)
        self._largest_iou.append(largest_iou.astype(np.float32))
        self._labelled.append(labelled)
        self._labels.append((labelled and pred_label == label, labelled and target_label == label))
        self.counts["labelled"] += labelled
        self.counts["gt_known_images"] += labelled and target_label == label
        self.counts["downscaled"] += downscaled
        self.counts["evaluated"] += 1
        self.images += 1
        self.per_image.append({
            "image_id": image_id, "width": width, "height": height, "first_box_iou": first_iou,
            "centre_box_iou": fixed_iou["centre"], "jaccard": jaccard,
            "label": label, "pred_label": pred_label, "target_label": target_label,
        })

    # ----------------------------------------------------------------------- results
    def _loc(self, hits: np.ndarray) -> tuple[float | None, float | None]:
        correct = np.array([c for c, _ in self._labels], dtype=bool)
        known = np.array([k for _, k in self._labels], dtype=bool)
        labelled = np.array(self._labelled, dtype=bool)
        top1 = _percent(float(np.count_nonzero(hits & correct)), int(labelled.sum()))
        gt_known = _percent(float(np.count_nonzero(hits & known)), int(known.sum()))
        return top1, gt_known

    def result(self) -> dict[str, Any]:
        n = self.images
        if not n:
            raise EvaluationError("no image with ground truth to evaluate")
        largest_acc = {iou: 100.0 * self.largest_hits[iou] / n for iou in IOU_THRESHOLDS}
        any_acc = {iou: 100.0 * self.any_hits[iou] / n for iou in IOU_THRESHOLDS}
        best = int(np.argmax(largest_acc[MAX_BOX_ACC_IOU]))
        hits = np.array(self._hits50, dtype=bool).reshape(n, -1)[:, best]
        top1, gt_known = self._loc(hits)
        curves = {name: pr_curve(*self.hist[name]) for name in self.hist}
        masks = self.counts["with_mask"]

        def jaccard(values: list[float]) -> float | None:
            return _percent(sum(j for j in values if j >= ISIC_JACCARD_CUTOFF), len(values)) if masks else None

        metrics: dict[str, Any] = {
            "max_box_acc": float(largest_acc[MAX_BOX_ACC_IOU][best]),
            "max_box_acc_v2": float(np.mean([any_acc[iou].max() for iou in IOU_THRESHOLDS])),
            "pxap": curves["cam"].pxap if masks else None,
            "top1_loc": top1,
            "gt_known_loc": gt_known,
            "mean_iou": 100.0 * self.iou_sum["cam"] / n,
            "jaccard_isic2018": jaccard(self.jaccards["cam"]),
        }
        for name in ("centre", "constant"):
            fixed_acc = {iou: 100.0 * self.fixed_hits[name][iou] / n for iou in IOU_THRESHOLDS}
            top1_b, gt_known_b = self._loc(np.array(self._fixed50[name], dtype=bool))
            metrics[f"{name}_baseline"] = {
                "max_box_acc": fixed_acc[MAX_BOX_ACC_IOU],
                "max_box_acc_v2": float(np.mean(list(fixed_acc.values()))),
                "pxap": curves[name].pxap if masks else None,
                "top1_loc": top1_b,
                "gt_known_loc": gt_known_b,
                "mean_iou": 100.0 * self.iou_sum[name] / n,
                "jaccard_isic2018": jaccard(self.jaccards[name]),
            }
        metrics["counts"] = dict(self.counts)
        metrics["details"] = {
            "best_threshold": float(CAM_THRESHOLDS[best]),
            "box_acc_v2_by_iou": {str(iou): float(any_acc[iou].max()) for iou in IOU_THRESHOLDS},
            "best_thresholds_v2": {str(iou): float(CAM_THRESHOLDS[int(np.argmax(any_acc[iou]))]) for iou in IOU_THRESHOLDS},
            "jaccard_mean": _percent(sum(self.jaccards["cam"]), len(self.jaccards["cam"])) if masks else None,
            "box_acc_curves": {
                "thresholds": [round(float(t), 2) for t in CAM_THRESHOLDS],
                "largest_contour": {str(iou): largest_acc[iou].tolist() for iou in IOU_THRESHOLDS},
                "all_contours": {str(iou): any_acc[iou].tolist() for iou in IOU_THRESHOLDS},
            },
            "pr_curves": {
                name: {"thresholds": c.thresholds.tolist(), "precision": c.precision.tolist(), "recall": c.recall.tolist()}
                for name, c in curves.items()
            } if masks else None,
        }
        metrics["settings"] = {
            "cam_curve_interval": CAM_CURVE_INTERVAL,
            "iou_thresholds": list(IOU_THRESHOLDS),
            "max_side": self.max_side,
            "run_thresholds": sorted(self.thresholds),
            "isic_jaccard_cutoff": ISIC_JACCARD_CUTOFF,
        }
        largest = np.array(self._largest_iou).reshape(n, -1)
        for row, iou in zip(self.per_image, largest[:, best]):
            row["largest_box_iou_at_best_threshold"] = float(iou)
        return metrics


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
_LIGHT = ("image_id", "run_id", "model_sha256", "method", "threshold", "target_mode", "input_size")
_HEAVY = ("image_id", "run_id", "width", "height", "cam", "cam_height", "cam_width", "boxes", "threshold",
          "label", "pred_label", "target_label")


def _select_rows(dataset, run_id: str | None) -> tuple[set[tuple[str, str]], list[str]]:
    """(run_id, image_id) pairs to evaluate, and the runs they come from.

    With run_id: that run's rows. Without: the newest run's model and settings (model_sha256,
    method, threshold, target_mode, input_size), every row with them, one per image (newest run).
    """
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
        # compared as text, every row converted the same way, so that nulls match nulls
        keys = table[settings].astype(str).agg("|".join, axis=1) if settings else table["run_id"].map(lambda _: "")
        newest = keys[table["run_id"] == runs[-1]].iloc[0]
        table = table[keys == newest]
    table = table.sort_values("run_id").drop_duplicates("image_id", keep="last")
    return set(zip(table["run_id"], table["image_id"])), sorted(table["run_id"].unique())


def _open_cams(output: str):
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    from camjobs.storage import open_filesystem

    fs, root = open_filesystem(output.rstrip("/"))
    cams = f"{root}/cams"
    if fs.get_file_info(cams).type != pafs.FileType.Directory:
        raise EvaluationError(f"{output}: no cams/ folder (not a camjobs output?)")
    return pads.dataset(cams, filesystem=fs, format="parquet", exclude_invalid_files=False)


def _first_box(boxes) -> tuple[float, float, float, float] | None:
    if boxes is None or len(boxes) == 0:
        return None
    b = boxes[0]
    return float(b["x_min"]), float(b["y_min"]), float(b["x_max"]), float(b["y_max"])


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


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def markdown_table(metrics: dict[str, Any]) -> str:
    lines = ["| metric | CAM | centre box | constant map |", "| --- | ---: | ---: | ---: |"]
    for key in METRIC_KEYS:
        lines.append(f"| {METRIC_NAMES[key]} | {_fmt(metrics[key])} | {_fmt(metrics['centre_baseline'][key])} "
                     f"| {_fmt(metrics['constant_baseline'][key])} |")
    return "\n".join(lines)


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
        f"- Run threshold(s) for mean IoU and the Jaccard: {run_thresholds}; "
        f"plain mean Jaccard: {_fmt(details['jaccard_mean'])}.",
        "- Sweep: CAM thresholds 0, 0.01, ..., 0.99 on the min-max normalized map (Choe et al., CVPR 2020).",
        "- centre box: the middle half of each side (a fixed box; a binary map for PxAP and the Jaccard).",
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
        "pr_curve.png": _png(draw_pr_plot(metrics)),
        "box_acc.png": _png(draw_box_acc_plot(metrics)),
    }
    files = {}
    for name, payload in contents.items():
        path = f"{root.rstrip('/')}/{name}"
        with fs.open_output_stream(path) as stream:
            stream.write(payload)
        files[name] = path if "://" not in report_dir else f"{report_dir.rstrip('/')}/{name}"
    return files


# --------------------------------------------------------------------------- plots (OpenCV, no matplotlib)
_W, _H = 1280, 680
_LEFT, _RIGHT, _TOP, _BOTTOM = 100, 420, 70, 90  # the legend goes in the right margin
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_BLUE, _ORANGE, _GREEN, _RED, _GREY, _BLACK = (200, 90, 30), (20, 130, 240), (60, 160, 40), (40, 40, 210), (140, 140, 140), (0, 0, 0)


def _png(image: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buffer.tobytes()


class _Axes:
    def __init__(self, title: str, xlabel: str, ylabel: str, xmax: float, ymax: float, xticks, yticks):
        self.image = np.full((_H, _W, 3), 255, np.uint8)
        self.x0, self.x1, self.y0, self.y1 = _LEFT, _W - _RIGHT, _H - _BOTTOM, _TOP
        self.xmax, self.ymax = xmax, ymax
        for value in yticks:
            _, y = self.point(0, value)
            cv2.line(self.image, (self.x0, y), (self.x1, y), (230, 230, 230), 1)
            self.text(f"{value:g}", (self.x0 - 10, y + 5), align="right")
        for value in xticks:
            x, _ = self.point(value, 0)
            cv2.line(self.image, (x, self.y0), (x, self.y1), (230, 230, 230), 1)
            cv2.line(self.image, (x, self.y0), (x, self.y0 + 6), _BLACK, 1)
            self.text(f"{value:g}", (x, self.y0 + 24), align="centre")
        cv2.rectangle(self.image, (self.x0, self.y1), (self.x1, self.y0), _BLACK, 1)
        self.text(title, ((self.x0 + self.x1) // 2, 40), scale=0.75, thickness=2, align="centre")
        self.text(xlabel, ((self.x0 + self.x1) // 2, _H - 30), scale=0.65, align="centre")
        # y label, rotated
        (tw, th), _ = cv2.getTextSize(ylabel, _FONT, 0.65, 1)
        label = np.full((th + 12, tw + 8, 3), 255, np.uint8)
        cv2.putText(label, ylabel, (4, th + 4), _FONT, 0.65, _BLACK, 1, cv2.LINE_AA)
        label = cv2.rotate(label, cv2.ROTATE_90_COUNTERCLOCKWISE)
        top = max(0, (self.y0 + self.y1) // 2 - label.shape[0] // 2)
        self.image[top: top + label.shape[0], 18: 18 + label.shape[1]] = label
        self.legend: list[tuple[str, tuple, str]] = []

    def point(self, x: float, y: float) -> tuple[int, int]:
        px = self.x0 + (self.x1 - self.x0) * min(max(x / self.xmax, 0.0), 1.0)
        py = self.y0 - (self.y0 - self.y1) * min(max(y / self.ymax, 0.0), 1.0)
        return int(round(px)), int(round(py))

    def text(self, text: str, origin, scale=0.5, thickness=1, colour=_BLACK, align="left"):
        (tw, _), _ = cv2.getTextSize(text, _FONT, scale, thickness)
        x = origin[0] - (tw if align == "right" else tw // 2 if align == "centre" else 0)
        cv2.putText(self.image, text, (int(x), int(origin[1])), _FONT, scale, colour, thickness, cv2.LINE_AA)

    def line(self, xs, ys, colour, label: str | None = None, style: str = "solid", thickness: int = 2):
        points = [self.point(x, y) for x, y in zip(xs, ys)]
        if style == "solid":
            if len(points) > 1:
                cv2.polylines(self.image, [np.array(points, np.int32)], False, colour, thickness, cv2.LINE_AA)
        else:
            dash = 10 if style == "dashed" else 3
            for a, b in zip(points, points[1:]):
                length = math.hypot(b[0] - a[0], b[1] - a[1])
                steps = max(1, int(length // dash))
                for k in range(0, steps, 2):
                    p = (a[0] + (b[0] - a[0]) * k / steps, a[1] + (b[1] - a[1]) * k / steps)
                    q = (a[0] + (b[0] - a[0]) * min(k + 1, steps) / steps, a[1] + (b[1] - a[1]) * min(k + 1, steps) / steps)
                    cv2.line(self.image, tuple(map(int, p)), tuple(map(int, q)), colour, thickness, cv2.LINE_AA)
        if label:
            self.legend.append((label, colour, style))

    def marker(self, x: float, y: float, colour):
        cv2.circle(self.image, self.point(x, y), 6, colour, 2, cv2.LINE_AA)

    def draw_legend(self):
        """The legend, in the right margin, level with the top of the plot."""
        if not self.legend:
            return
        width = max(cv2.getTextSize(label, _FONT, 0.5, 1)[0][0] for label, _, _ in self.legend) + 70
        height = 26 * len(self.legend) + 12
        x, y = self.x1 + 20, self.y1
        cv2.rectangle(self.image, (x, y), (x + width, y + height), (255, 255, 255), -1)
        cv2.rectangle(self.image, (x, y), (x + width, y + height), _GREY, 1)
        for k, (label, colour, style) in enumerate(self.legend):
            cy = y + 20 + 26 * k
            if style == "solid":
                cv2.line(self.image, (x + 10, cy - 4), (x + 50, cy - 4), colour, 2, cv2.LINE_AA)
            else:
                gap = 8 if style == "dashed" else 3
                for sx in range(x + 10, x + 50, 2 * gap):
                    cv2.line(self.image, (sx, cy - 4), (min(sx + gap, x + 50), cy - 4), colour, 2, cv2.LINE_AA)
            cv2.putText(self.image, label, (x + 60, cy), _FONT, 0.5, _BLACK, 1, cv2.LINE_AA)
        self.legend_bottom = y + height

    def notes(self, lines: list[str]):
        """Lines of text in the right margin, below the legend."""
        y = getattr(self, "legend_bottom", self.y1) + 30
        for k, line in enumerate(lines):
            cv2.putText(self.image, line, (self.x1 + 22, y + 22 * k), _FONT, 0.45, (60, 60, 60), 1, cv2.LINE_AA)


def draw_pr_plot(metrics: dict[str, Any]) -> np.ndarray:
    """Pixel precision-recall curves of the CAM and the baselines (BGR image)."""
    ticks = [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    axes = _Axes("Pixel precision-recall (PxAP)", "recall", "precision", 1.0, 1.0, ticks, ticks)
    curves = metrics["details"].get("pr_curves")
    if not curves:
        axes.text("no masks: PxAP needs lesion masks", ((axes.x0 + axes.x1) // 2, _H // 2), scale=0.7, align="centre")
        return axes.image
    styles = {"cam": (_BLUE, "solid", "CAM"), "centre": (_ORANGE, "solid", "centre box"),
              "constant": (_GREY, "dashed", "constant map (all pixels)")}
    for name in ("constant", "centre", "cam"):
        curve = curves[name]
        colour, style, title = styles[name]
        pxap = metrics["pxap"] if name == "cam" else metrics[f"{name}_baseline"]["pxap"]
        xs, ys = _steps(np.array(curve["recall"]), np.array(curve["precision"]))
        axes.line(xs, ys, colour, f"{title}: PxAP {_fmt(pxap)}", style)
    axes.draw_legend()
    counts = metrics["counts"]
    axes.notes([
        f"{counts['with_mask']} images with masks, pixels pooled.",
        "Precision and recall of the pixels with",
        "normalized CAM >= t, for t = 1, 0.99, ..., 0.",
        "PxAP: the area under the steps (x100).",
    ])
    return axes.image


def _steps(recall: np.ndarray, precision: np.ndarray) -> tuple[list[float], list[float]]:
    """The staircase whose area is PxAP: precision_k over recall (recall_{k-1}, recall_k]."""
    xs, ys, previous = [], [], 0.0
    for r, p in zip(recall, precision):
        if r > previous or not xs:
            xs += [previous, r]
            ys += [p, p]
            previous = r
    return xs, ys


def draw_box_acc_plot(metrics: dict[str, Any]) -> np.ndarray:
    """BoxAcc against the CAM threshold for IoU 0.3/0.5/0.7 (BGR image)."""
    curves = metrics["details"]["box_acc_curves"]
    thresholds = curves["thresholds"]
    axes = _Axes("BoxAcc against the CAM threshold", "CAM threshold", "BoxAcc (%)", 1.0, 100.0,
                 [0, 0.2, 0.4, 0.6, 0.8, 1.0], [0, 20, 40, 60, 80, 100])
    colours = {"0.3": _GREEN, "0.5": _BLUE, "0.7": _RED}
    for iou, colour in colours.items():
        values = curves["all_contours"][iou]
        best = int(np.argmax(values))
        axes.line(thresholds, values, colour, f"all contours, IoU {iou}: max {values[best]:.1f}")
        axes.marker(thresholds[best], values[best], colour)
    values = curves["largest_contour"]["0.5"]
    best = int(np.argmax(values))
    axes.line(thresholds, values, _BLACK, f"largest contour, IoU 0.5 (MaxBoxAcc): {values[best]:.1f}", "dashed")
    axes.marker(thresholds[best], values[best], _BLACK)
    centre = metrics["centre_baseline"]["max_box_acc"]
    axes.line([0, 1], [centre, centre], _ORANGE, f"centre box, IoU 0.5: {centre:.1f}", "dotted")
    axes.draw_legend()
    axes.notes([
        f"{metrics['counts']['evaluated']} images; circles mark the maxima.",
        f"MaxBoxAcc: {metrics['max_box_acc']:.2f} at threshold {metrics['details']['best_threshold']:.2f}.",
        f"MaxBoxAccV2: {metrics['max_box_acc_v2']:.2f}, the mean of the",
        "three all-contour maxima.",
    ])
    return axes.image


# --------------------------------------------------------------------------- the entry point
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
) -> EvaluationReport:
    """Evaluate the maps in ``output_dir/cams`` against one source of ground truth.

    data: a dataset with lesion masks (camjobs.layouts; ham10000, isic2017, isic2018); masks: a
    folder of ``<image_id>_segmentation.png`` or ``<image_id>.png``; boxes: a COCO json. Rows:
    ``run_id``'s, or by default the newest run's model and settings over every run (one row per
    image, the newest). Writes the report to ``report_dir`` (default ``output_dir/eval``) unless
    ``write`` is False. Raises EvaluationError when there is nothing to evaluate.
    """
    import pyarrow.compute as pc
    from tqdm import tqdm

    dataset = _open_cams(output_dir)
    selected, runs = _select_rows(dataset, run_id)
    truth_source = _TruthSource(data, masks, boxes)
    evaluator = CamEvaluator(max_side=max_side)
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
            cam = np.asarray(row["cam"], dtype=np.float32).reshape(int(row["cam_height"]), int(row["cam_width"]))
            threshold = row.get("threshold")
            evaluator.add(
                cam, width, height, truth,
                threshold=DEFAULT_THRESHOLD if threshold is None else float(threshold),
                first_box=_first_box(row.get("boxes")),
                label=row.get("label"), pred_label=row.get("pred_label"), target_label=row.get("target_label"),
                image_id=row["image_id"],
            )
    bar.close()
    if not evaluator.images:
        raise EvaluationError(
            f"none of the {len(selected)} images has ground truth in {truth_source.description} "
            f"({skipped['no_ground_truth']} without, {skipped['empty_ground_truth']} empty)"
        )
    metrics = evaluator.result()
    metrics["counts"] = {"images": len(selected), **metrics["counts"], **skipped, **truth_source.counts}
    metrics["settings"].update({"output": output_dir, "runs": runs, "ground_truth": truth_source.description})
    report = EvaluationReport(metrics)
    if write:
        report.report_dir = report_dir or f"{output_dir.rstrip('/')}/eval"
        report.files = write_report(metrics, evaluator.per_image, report.report_dir)
    return report
