"""Lesion masks from the image's own evidence: the Otsu baseline and the CAM-guided refinement.

``refine`` is what ``camjobs run --refine`` writes (method ``REFINE_METHOD``): the CAM decides
*which* region is the lesion, the image decides its outline. On a working image of longer
side ``REFINE_SIDE`` (the decode stage makes it, so a 6000 px photograph costs what a 600 px
one does):

1. hair is lifted by a grey closing (a dark line thinner than the disc disappears) of
   diameter ``hair_fraction`` x the longer side, then a Gaussian blur of sigma ``BLUR_SIGMA`` x it;
2. the blue channel (``channel``) is the lesion's evidence: melanin absorbs blue most, so
   lesions stand out there more than in grey, where reddish skin and brown lesions look alike;
3. the dermoscope's black rim is left out of the field of view: components darker than
   ``rim_darkness`` x the median (near black: a rim, not the gradual shade of a vignette, which
   Otsu's threshold handles better left in) that touch the border and lie mostly in its outer
   tenth (a dark lesion in the middle is not a rim, even where a hair joins it to the edge);
4. foreground = evidence <= Otsu's threshold over the field of view / ``looseness``:
   slightly looser than Otsu, as the lighter rim of a lesion belongs to it;
5. each 8-connected component scores its area (divided by ``BORDER_PENALTY`` if it touches
   the border) times ``cam_floor`` + the mean of the map (U / max U) over it; the best wins,
   its holes are filled, and it is resized to the image's size.

The names are the fields of ``RefineRule``; ``REFINE_RULE`` holds the values ``--refine`` uses.

A map that is empty (max U <= 0) or flat says nothing about where the lesion is: no mask.
The measurements behind each choice (each step left out or changed in turn) are in
benchmarks/fidelity.py and its results.

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

from dataclasses import dataclass

import cv2
import numpy as np

from camjobs.geometry import resize_mask

WORK_SIDE = 512  # longer side of the Otsu baseline's working image, in pixels
BLUR_SIGMA = 0.01  # Gaussian sigma as a fraction of the working image's longer side
BORDER_PENALTY = 4.0  # a component touching the border scores a quarter of its area

REFINE_METHOD = "cam-blue-otsu-1"  # written to the refine column; change it when REFINE_RULE changes
REFINE_SIDE = 200  # longer side of the refinement's working image, in pixels
RIM_BAND = 0.1  # the outer band, as a fraction of the shorter side, where a rim lies
FLAT_RTOL = 1e-6  # a map whose range is below this fraction of its peak is flat


@dataclass(frozen=True)
class RefineRule:
    """The refinement's settings (steps above); a value, so that benchmarks compare variants."""

    channel: int | None = 2  # the RGB channel that is the lesion's evidence; None: grey
    hair_fraction: float = 0.025  # 0: no hair lifting
    rim_darkness: float = 0.2  # 0: no rim left out
    looseness: float = 0.95  # 1: Otsu's threshold as it is
    cam_floor: float = 0.25  # a component the map ignores still counts, at a quarter of its area


REFINE_RULE = RefineRule()


def work_size(width: int, height: int, max_side: int = WORK_SIDE) -> tuple[int, int]:
    """(width, height) of the working image: the image's own where it is small enough."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_work(rgb: np.ndarray, max_side: int = WORK_SIDE, original: tuple[int, int] | None = None) -> np.ndarray:
    """The RGB image at its working size (area averaging, so no aliasing). `original` is the
    image's (width, height) where `rgb` is a reduced decode of it: the working size follows
    from the original's, so that a later stage knows it from the width and height alone."""
    height, width = rgb.shape[:2]
    size = work_size(*(original or (width, height)), max_side)
    if size == (width, height):
        return np.ascontiguousarray(rgb)
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def _blur(image: np.ndarray) -> np.ndarray:
    sigma = BLUR_SIGMA * max(image.shape[:2])
    return cv2.GaussianBlur(image, (0, 0), sigma) if sigma >= 0.3 else image


def blurred_grey(rgb: np.ndarray) -> np.ndarray:
    return _blur(cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY))


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


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with every region it encloses filled (flood fill of the background from outside)."""
    padded = np.pad(mask.astype(np.uint8), 1)
    cv2.floodFill(padded, None, (0, 0), 2)
    return padded[1:-1, 1:-1] != 2


def lesion_evidence(work_rgb: np.ndarray, rule: RefineRule = REFINE_RULE) -> np.ndarray:
    """Steps 1-2: the blurred evidence channel with hair lifted, uint8 (dark = lesion)."""
    lifted = np.ascontiguousarray(work_rgb)
    if rule.hair_fraction > 0:
        diameter = max(3, round(rule.hair_fraction * max(work_rgb.shape[:2])) | 1)
        disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (diameter, diameter))
        lifted = cv2.morphologyEx(lifted, cv2.MORPH_CLOSE, disc)
    if rule.channel is None:
        return blurred_grey(lifted)
    return _blur(np.ascontiguousarray(lifted[..., rule.channel]))


def field_of_view(evidence: np.ndarray, rule: RefineRule = REFINE_RULE) -> np.ndarray:
    """Step 3: False on the dermoscope's dark rim (and a margin of 2 pixels around it)."""
    height, width = evidence.shape
    dark = (evidence < rule.rim_darkness * np.median(evidence)).view(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(dark, connectivity=8)
    band = np.ones_like(dark, dtype=bool)
    margin = max(2, int(RIM_BAND * min(height, width)))
    band[margin:-margin, margin:-margin] = False
    in_band = np.bincount(labels[band], minlength=count) / np.maximum(stats[:, cv2.CC_STAT_AREA], 1)
    rim = (in_band >= 0.5) & touches_border(stats, width, height)
    rim[0] = False
    return ~cv2.dilate(rim[labels].view(np.uint8), np.ones((5, 5), np.uint8)).view(bool)


def is_flat(norm: np.ndarray) -> bool:
    """No region to refine: an empty map (all zeros after normalizing) or a flat one."""
    peak = float(norm.max()) if norm.size else 0.0
    return not peak > 0 or float(norm.max() - norm.min()) <= FLAT_RTOL * peak


def refine_work_mask(work_rgb: np.ndarray, work_norm: np.ndarray, rule: RefineRule = REFINE_RULE) -> np.ndarray | None:
    """Steps 1-5 at the working size; `work_norm` is U / max U at that size. None: no lesion found."""
    evidence = lesion_evidence(work_rgb, rule)
    inside = field_of_view(evidence, rule)
    values = evidence[inside]
    if values.size < 2 or int(values.min()) == int(values.max()):
        return None
    otsu, _ = cv2.threshold(values.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    foreground = ((evidence <= otsu / rule.looseness) & inside).view(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(foreground, connectivity=8)
    if count <= 1:
        return None
    height, width = evidence.shape
    areas = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
    cam_mean = np.bincount(labels.ravel(), weights=work_norm.ravel(), minlength=count)[1:] / areas
    scores = areas * (rule.cam_floor + cam_mean)
    scores[touches_border(stats[1:], width, height)] /= BORDER_PENALTY
    return fill_holes(labels == int(np.argmax(scores)) + 1)


def refine(
    work_rgb: np.ndarray, norm: np.ndarray, width: int, height: int, rule: RefineRule = REFINE_RULE
) -> np.ndarray | None:
    """The refined lesion mask at (height, width) (column-major, for COCO's RLE), from the working
    image and the map U / max U (any size: it is resized to the working image's); None where the
    map is empty or flat or the image shows no lesion."""
    if is_flat(norm):
        return None
    work_height, work_width = work_rgb.shape[:2]
    work_norm = cv2.resize(np.asarray(norm, np.float32), (work_width, work_height), interpolation=cv2.INTER_LINEAR)
    mask = refine_work_mask(work_rgb, work_norm, rule)
    return None if mask is None else resize_mask(mask, width, height, fortran=True)
