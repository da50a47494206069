"""The arithmetic of ``camjobs evaluate``: IoUs, the threshold sweep, pixel histograms and PxAP.

Pure numpy and OpenCV, no I/O. Every rule here is spelled out in ``camjobs.labels.evaluate``'s module
docstring (after Choe et al., CVPR 2020, and wsolevaluation's code); the score sources in
``camjobs.labels.scores`` put them together.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import cv2
import numpy as np

from camjobs.geometry import XYXY, box_iou_matrix

CAM_CURVE_INTERVAL = 0.01
CAM_THRESHOLDS = np.arange(0, 1, CAM_CURVE_INTERVAL)  # the sweep, as wsolevaluation builds it
IOU_THRESHOLDS = (0.3, 0.5, 0.7)  # MaxBoxAccV2
MAX_BOX_ACC_IOU = 0.5  # MaxBoxAcc, GT-known and top-1 Loc, and the IoU >= 0.5 share
PXAP_EDGES = np.append(CAM_THRESHOLDS, [1.0, 2.0, 3.0])  # histogram bin edges for PxAP
ISIC_JACCARD_CUTOFF = 0.65  # ISIC 2018 Task 1: per-image Jaccard below this scores 0
CONSTANT_RTOL = 1e-6  # a map whose range is below this fraction of its magnitude is constant


def percent(hits: float, total: int) -> float | None:
    """100 * hits / total; None when there is nothing to count."""
    return 100.0 * hits / total if total else None


def best_ious(boxes: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """For each of n xyxy boxes, its best IoU (``box_iou_matrix``) with any of m ground-truth boxes."""
    iou = box_iou_matrix(boxes, truth)
    return iou.max(axis=1) if iou.shape[1] else np.zeros(iou.shape[0])


def box_region(
    box: XYXY, width: int, height: int, grid_width: int | None = None, grid_height: int | None = None
) -> np.ndarray:
    """Pixels of a grid_height x grid_width grid over a width x height image whose centres lie in box."""
    grid_width, grid_height = grid_width or width, grid_height or height
    xs = (np.arange(grid_width) + 0.5) * (width / grid_width)
    ys = (np.arange(grid_height) + 0.5) * (height / grid_height)
    inside_x = (xs >= box[0]) & (xs < box[2])
    inside_y = (ys >= box[1]) & (ys < box[3])
    return inside_y[:, None] & inside_x[None, :]


def eval_grid(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """The (width, height) the sweep metrics use: the image's, or scaled to long side max_side."""
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def mask_to_grid(mask: np.ndarray, grid_width: int, grid_height: int) -> np.ndarray:
    """A full-size boolean mask on the sweep's grid: INTER_AREA, then > 127 (as masks are read)."""
    if mask.shape == (grid_height, grid_width):
        return mask
    resized = cv2.resize(mask.astype(np.uint8) * 255, (grid_width, grid_height), interpolation=cv2.INTER_AREA)
    return resized > 127


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
    """wsolevaluation's boxes per threshold (None where no pixel passes); see camjobs.labels.evaluate."""
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


def run_region(upsampled: np.ndarray, threshold: float) -> np.ndarray:
    """camjobs' box rule on an upsampled map: clip(U / max U, 0, 1) >= T; empty when max U <= 0.

    In float32, as ``camjobs.pipeline.localize.normalized`` computes it, so it is the region the run's
    boxes were drawn from.
    """
    upsampled = np.asarray(upsampled, dtype=np.float32)
    peak = upsampled.max()
    if not np.isfinite(peak) or peak <= 0:
        return np.zeros(upsampled.shape, bool)
    return np.clip(upsampled / peak, 0.0, 1.0) >= np.float32(threshold)


# --------------------------------------------------------------------------- PxAP
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


def binary_histograms(region: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pixel_histograms of a map that is 1 on region and 0 elsewhere (without a float map)."""
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

    def as_dict(self) -> dict[str, list[float]]:
        """The curve as metrics.json's details.pr_curves holds it."""
        return {
            "thresholds": self.thresholds.tolist(),
            "precision": self.precision.tolist(),
            "recall": self.recall.tolist(),
        }


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
