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


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """The tightest xyxy box (max exclusive) around all foreground pixels; None if empty."""
    ys = np.flatnonzero(np.any(mask, axis=1))
    if ys.size == 0:
        return None
    xs = np.flatnonzero(np.any(mask, axis=0))
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def centre_box(width: float, height: float, frac: float = 0.5) -> tuple[float, float, float, float]:
    """The baseline: a centred box with `frac` of the image's width and height."""
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    box_width, box_height = width * frac, height * frac
    x0, y0 = (width - box_width) / 2.0, (height - box_height) / 2.0
    return x0, y0, x0 + box_width, y0 + box_height


def box_iou(a: Box, b: Box) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union if union > 0 else 0.0
