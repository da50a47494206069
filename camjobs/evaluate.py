"""Localization quality of weak boxes against ground-truth lesion masks."""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

Box = Sequence[float]  # x_min, y_min, x_max, y_max; max exclusive


def read_mask(path: str) -> np.ndarray:
    """A lesion mask as bool; masks resized with interpolation hold grey edges, so > 127."""
    mask = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError(f"could not read mask {path}")
    return mask > 127


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """The tightest xyxy box (max exclusive) around all foreground pixels; None if empty."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def box_iou(a: Box, b: Box) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union if union > 0 else 0.0
