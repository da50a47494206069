"""Image-only lesion segmentation: the classical baseline that CAM-based labels must beat.

``otsu_lesion_mask`` is the rule ``camjobs evaluate`` reports as ``otsu_baseline``:

1. work at a reduced size (``work_size``: longer side at most ``WORK_SIDE`` pixels, area
   averaging), so that a 6000 px photograph costs what a 600 px one does;
2. grey = OpenCV's RGB -> grey, blurred by a Gaussian of sigma ``BLUR_SIGMA`` x the longer side;
3. foreground = grey <= Otsu's threshold of the blurred grey image (lesions are darker than skin);
4. 8-connected components of the foreground; each scores its area, divided by
   ``BORDER_PENALTY`` if it touches the image's border (dark vignette corners and large
   shadows touch it, a lesion seldom does); the best score wins, the first in OpenCV's label
   order on a tie;
5. that component, resized to the image's size (``geometry.resize_mask``), is the mask.

An image whose grey values are all equal has no foreground: the mask is None.
Needs numpy and OpenCV only.
"""

from __future__ import annotations

import cv2
import numpy as np

from camjobs.geometry import resize_mask

WORK_SIDE = 512  # longer side of the working image, in pixels
BLUR_SIGMA = 0.01  # Gaussian sigma as a fraction of the working image's longer side
BORDER_PENALTY = 4.0  # a component touching the border scores a quarter of its area


def work_size(width: int, height: int, max_side: int = WORK_SIDE) -> tuple[int, int]:
    """(width, height) of the working image: the image's own where it is small enough."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_work(rgb: np.ndarray, max_side: int = WORK_SIDE) -> np.ndarray:
    """The RGB image at its working size (area averaging, so no aliasing)."""
    height, width = rgb.shape[:2]
    size = work_size(width, height, max_side)
    if size == (width, height):
        return np.ascontiguousarray(rgb)
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def blurred_grey(rgb: np.ndarray) -> np.ndarray:
    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    sigma = BLUR_SIGMA * max(grey.shape)
    return cv2.GaussianBlur(grey, (0, 0), sigma) if sigma >= 0.3 else grey


def touches_border(stats: np.ndarray, width: int, height: int) -> np.ndarray:
    """Per row of cv2 component stats: does the component's bounding box reach the border?"""
    x, y, w, h = stats[:, 0], stats[:, 1], stats[:, 2], stats[:, 3]
    return (x == 0) | (y == 0) | (x + w == width) | (y + h == height)


def otsu_work_mask(work_rgb: np.ndarray) -> np.ndarray | None:
    """Steps 2-4 of the rule on an image already at its working size."""
    grey = blurred_grey(work_rgb)
    if int(grey.min()) == int(grey.max()):
        return None
    _, dark = cv2.threshold(grey, 0, 1, cv2.THRESH_BINARY_INV | cv2.THRESH_OTSU)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(dark, connectivity=8)
    if count <= 1:
        return None
    height, width = grey.shape
    scores = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
    scores[touches_border(stats[1:], width, height)] /= BORDER_PENALTY
    return labels == int(np.argmax(scores)) + 1


def otsu_lesion_mask(rgb: np.ndarray, width: int | None = None, height: int | None = None) -> np.ndarray | None:
    """The baseline's lesion mask of an RGB image, at (height, width) (default: the RGB's own
    size; pass the original's where `rgb` was decoded at a reduced size); None if it has none."""
    work = otsu_work_mask(to_work(rgb))
    if work is None:
        return None
    return resize_mask(work, width or rgb.shape[1], height or rgb.shape[0])
