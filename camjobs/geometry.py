"""Boxes and binary masks: one home for their conventions, as torchvision's ``ops/boxes.py``.

Boxes are absolute pixels in torchvision's xyxy convention, ``(x_min, y_min, x_max, y_max)``
with x_max and y_max exclusive: the box of a single pixel (x, y) is (x, y, x + 1, y + 1).
Masks are boolean (height, width) arrays at the image's own size. Run-length encoded masks
are COCO's compressed RLE (``{"size": [height, width], "counts": str}``, column-major), made
and read by pycocotools, so every COCO tool reads what camjobs writes.

The output's box struct (``schema.BOX_TYPE``, a dict of x_min, y_min, x_max, y_max, score) is
the same xyxy box; ``box_xyxy`` makes it a tuple. COCO's ``bbox`` is xywh (top-left corner, width,
height) and YOLO's is cxcywh (centre, width, height): ``xyxy_to_xywh``, ``xywh_to_xyxy`` and
``xyxy_to_cxcywh`` convert, in whatever units the box has.

Needs numpy, OpenCV, pycocotools and pyarrow's file systems only (no torch, no Ray): the label
tools import it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from camjobs.storage import open_filesystem

XYXY = Sequence[float]  # x_min, y_min, x_max, y_max; max exclusive

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Box:
    """One box of the output: xyxy pixels (max exclusive) and its score, as ``schema.BOX_TYPE`` stores it."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float
    score: float

    @classmethod
    def from_struct(cls, box: Mapping[str, float]) -> Box:
        """The box of one item of a ``boxes`` or ``refined_boxes`` column."""
        return cls(*box_xyxy(box), float(box["score"]))

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return self.x_min, self.y_min, self.x_max, self.y_max

    @property
    def area(self) -> float:
        return (self.x_max - self.x_min) * (self.y_max - self.y_min)

    def as_dict(self) -> dict[str, float]:
        """The box as an item of ``schema.BOX_TYPE``."""
        return {name: getattr(self, name) for name in ("x_min", "y_min", "x_max", "y_max", "score")}


def box_xyxy(box: Mapping[str, float]) -> tuple[float, float, float, float]:
    """A box of the output's box struct (a dict with x_min, y_min, x_max, y_max) as an xyxy tuple."""
    return float(box["x_min"]), float(box["y_min"]), float(box["x_max"]), float(box["y_max"])


def xyxy_to_xywh(box: XYXY) -> tuple[float, float, float, float]:
    """COCO's bbox (x_min, y_min, width, height) of an xyxy box; width = x_max - x_min (max exclusive)."""
    return box[0], box[1], box[2] - box[0], box[3] - box[1]


def xywh_to_xyxy(box: XYXY) -> tuple[float, float, float, float]:
    """The xyxy box of COCO's bbox (x_min, y_min, width, height)."""
    return box[0], box[1], box[0] + box[2], box[1] + box[3]


def xyxy_to_cxcywh(box: XYXY) -> tuple[float, float, float, float]:
    """YOLO's (centre x, centre y, width, height) of an xyxy box, in the box's units."""
    return (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0, box[2] - box[0], box[3] - box[1]


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """The tightest xyxy box (max exclusive) around all foreground pixels; None if empty."""
    ys = np.flatnonzero(np.any(mask, axis=1))
    if ys.size == 0:
        return None
    xs = np.flatnonzero(np.any(mask, axis=0))
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def centre_box(width: float, height: float, frac: float = 0.5) -> tuple[float, float, float, float]:
    """The baseline: a centred xyxy box with `frac` of the image's width and height."""
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    box_width, box_height = width * frac, height * frac
    x0, y0 = (width - box_width) / 2.0, (height - box_height) / 2.0
    return x0, y0, x0 + box_width, y0 + box_height


def box_iou_matrix(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """The (n, m) IoUs of n xyxy boxes with m others, as torchvision's ``ops.box_iou`` (in numpy):
    plain areas (max exclusive, so no +1); 0 where the union is empty."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[:, None, :]
    others = np.asarray(others, dtype=np.float64).reshape(-1, 4)[None, :, :]
    width = np.maximum(0.0, np.minimum(boxes[..., 2], others[..., 2]) - np.maximum(boxes[..., 0], others[..., 0]))
    height = np.maximum(0.0, np.minimum(boxes[..., 3], others[..., 3]) - np.maximum(boxes[..., 1], others[..., 1]))
    intersection = width * height
    union = (
        (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
        + (others[..., 2] - others[..., 0]) * (others[..., 3] - others[..., 1])
        - intersection
    )
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def box_iou(a: XYXY, b: XYXY) -> float:
    """IoU of two xyxy boxes (``box_iou_matrix`` of one box each); 0 for empty boxes."""
    return float(box_iou_matrix(a, b)[0, 0])


def mask_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|a & b| / |a | b| of two boolean masks of one size; 0 where both are empty."""
    if a.shape != b.shape:
        raise ValueError(f"masks of different sizes: {a.shape} and {b.shape}")
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b)) / union if union else 0.0


# Up to this many components, each one's statistics come from its own mask inside its bounding
# rectangle (OpenCV's statistics pass over the whole label image costs 4-5 x the labelling itself);
# beyond it, from that pass. Upsampled maps and refined masks have a few.
_FEW_COMPONENTS = 16


def component_stats(mask: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Rows (x, y, width, height, area, mean score) of the 8-connected components of a mask,
    largest area first; equal areas keep OpenCV's label order (a stable sort), so the output is
    deterministic. (0, 6) when the mask is empty. A column-major mask is labelled as its
    transpose (the same components; no 12-megapixel reordering) and the rows swapped back."""
    mask = np.asarray(mask)
    if mask.flags.f_contiguous and not mask.flags.c_contiguous:
        stats = component_stats(mask.T, np.asarray(score).T)
        return stats[:, [1, 0, 3, 2, 4, 5]]
    inside = np.ascontiguousarray(mask).view(np.uint8)
    # Grana's block-based algorithm: the same components as OpenCV's default, in half the time.
    count, labels = cv2.connectedComponentsWithAlgorithm(inside, 8, cv2.CV_32S, cv2.CCL_GRANA)
    if count <= 1:
        return np.zeros((0, 6))
    if count - 1 <= _FEW_COMPONENTS:
        stats = np.array(
            [
                _mask_stats(score, inside if count == 2 else (labels == index).view(np.uint8))
                for index in range(1, count)
            ],
            dtype=np.float64,
        )
    else:
        stats = _label_stats(score, inside, count)
    return stats[np.argsort(-stats[:, 4], kind="stable")]


def _mask_stats(score: np.ndarray, mask: np.ndarray) -> tuple[int, int, int, int, int, float]:
    x, y, w, h = cv2.boundingRect(mask)
    inner = mask[y : y + h, x : x + w]
    region = np.ascontiguousarray(score[y : y + h, x : x + w])  # a transposed score: only this rectangle is copied
    return x, y, w, h, cv2.countNonZero(inner), cv2.mean(region, mask=inner)[0]


def _label_stats(score: np.ndarray, inside: np.ndarray, count: int) -> np.ndarray:
    _, labels, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(inside, 8, cv2.CV_32S, cv2.CCL_GRANA)
    found = labels > 0
    sums = np.bincount(labels[found], weights=np.asarray(score)[found].astype(np.float64), minlength=count)[1:]
    areas = stats[1:, cv2.CC_STAT_AREA]
    return np.column_stack([stats[1:, :5].astype(np.float64), sums / areas])


def component_boxes(mask: np.ndarray, score: np.ndarray) -> list[dict]:
    """One xyxy box per 8-connected component of a boolean mask, largest area first, as dicts
    of the output's box struct; a box's score is the mean of `score` (the mask's shape, float32)
    over its component."""
    return [
        {"x_min": float(x), "y_min": float(y), "x_max": float(x + w), "y_max": float(y + h), "score": float(mean)}
        for x, y, w, h, _, mean in component_stats(mask, np.asarray(score, np.float32))
    ]


def rle_encode(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a boolean (height, width) mask: {"size": [h, w], "counts": str}.

    COCO's runs go down the columns: a Fortran-ordered mask (resize_mask(..., fortran=True))
    is encoded without a copy; a C-ordered one is reordered first."""
    from pycocotools import mask as coco_mask

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask is 2-D (height, width), got shape {mask.shape}")
    rle = coco_mask.encode(np.asfortranarray(mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_decode(rle: dict) -> np.ndarray:
    """The boolean (height, width) mask of a COCO RLE (counts as str or bytes, or uncompressed)."""
    from pycocotools import mask as coco_mask

    size = [int(v) for v in rle["size"]]
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE, as COCO files may hold
        compressed = coco_mask.frPyObjects({"size": size, "counts": counts}, *size)
    else:
        compressed = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    with warnings.catch_warnings():
        # pycocotools' decode asks numpy 2 for copy=False on its own array type, which numpy
        # answers with a DeprecationWarning per call; the mask is right either way.
        warnings.filterwarnings(
            "ignore", message="__array__ implementation doesn't accept a copy", category=DeprecationWarning
        )
        return coco_mask.decode(compressed).astype(bool)


def rle_area(rle: dict) -> int:
    """Foreground pixels of a COCO RLE, without decoding it."""
    from pycocotools import mask as coco_mask

    counts = rle["counts"]
    return int(
        coco_mask.area(
            {
                "size": [int(v) for v in rle["size"]],
                "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
            }
        )
    )


def mask_polygons(mask: np.ndarray, *, min_area: float = 1.0, epsilon: float = 1.0) -> list[np.ndarray]:
    """The outer outlines of a boolean mask as (n, 2) float arrays of x, y pixel coordinates.

    Outlines from cv2.findContours (outer borders only, holes ignored), simplified by
    Douglas-Peucker with `epsilon` pixels; outlines of under `min_area` pixels or with fewer
    than 3 points are left out. Largest area first.
    """
    contours, _ = cv2.findContours(
        np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    outlines = []
    for contour in sorted(contours, key=cv2.contourArea, reverse=True):
        if cv2.contourArea(contour) < min_area:
            continue
        points = cv2.approxPolyDP(contour, epsilon, True).reshape(-1, 2).astype(np.float64)
        if len(points) >= 3:
            outlines.append(points)
    return outlines


def resize_mask(mask: np.ndarray, width: int, height: int, *, fortran: bool = False) -> np.ndarray:
    """A boolean mask resized to (height, width): area averaging down, bilinear up, then >= 0.5.

    fortran=True gives it in column-major memory (resized as its transpose, the same pixels),
    the order COCO's run-length encoder reads."""
    mask = np.asarray(mask, dtype=np.uint8)
    if fortran:
        return resize_mask(mask.T, height, width).T
    if mask.shape == (height, width):
        return mask.astype(bool)
    shrinking = width <= mask.shape[1] and height <= mask.shape[0]
    resized = cv2.resize(
        mask * np.uint8(255), (int(width), int(height)), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    )
    return resized >= 128


def resize_mask_nearest(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """A boolean mask at (height, width) by nearest neighbour: how a ground-truth mask stored at
    another size than its image is brought to the image's (each pixel keeps a stored pixel's label)."""
    return cv2.resize(np.asarray(mask, dtype=np.uint8), (int(width), int(height)), interpolation=cv2.INTER_NEAREST) > 0


def read_mask(path: str) -> np.ndarray:
    """A lesion mask image (a local path or a URI: s3://, gs://, file://) as bool, foreground > 127:
    masks saved after an interpolating resize hold grey edges. ValueError where it is no image."""
    if "://" in path:
        fs, inner = open_filesystem(path)
        with fs.open_input_file(inner) as stream:
            mask = cv2.imdecode(np.frombuffer(stream.read(), np.uint8), cv2.IMREAD_GRAYSCALE)
    else:
        mask = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError(f"could not read mask {path}")
    return mask > 127


def rle_mask(rle: dict, width: int, height: int) -> np.ndarray:
    """A row's mask_rle decoded at its image's size (resized, with a warning, where it was not)."""
    mask = rle_decode(rle)
    if mask.shape != (height, width):
        log.warning("mask of %dx%d for an image of %dx%d: resized", mask.shape[1], mask.shape[0], width, height)
        mask = resize_mask(mask, width, height)
    return mask


def box_components(mask: np.ndarray, boxes: Sequence[Mapping[str, float]]) -> list[np.ndarray]:
    """Each box's own part of the mask: the 8-connected component whose box it is (refined boxes
    are component_boxes of the mask), else the mask inside the box. Boxes of the output's struct."""
    count, labels, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(
        np.ascontiguousarray(mask, dtype=np.uint8), 8, cv2.CV_32S, cv2.CCL_GRANA
    )
    by_box: dict[tuple[int, ...], list[int]] = {}
    for label in 1 + np.argsort(-stats[1:, cv2.CC_STAT_AREA], kind="stable"):  # largest first, as boxes are
        x, y, w, h = (int(v) for v in stats[label, :4])
        by_box.setdefault((x, y, x + w, y + h), []).append(int(label))
    parts = []
    for box in boxes:
        key = tuple(max(0, int(round(value))) for value in box_xyxy(box))
        if by_box.get(key):
            parts.append(labels == by_box[key].pop(0))
            continue
        part = np.zeros_like(mask, dtype=bool)
        part[key[1] : key[3], key[0] : key[2]] = mask[key[1] : key[3], key[0] : key[2]]
        parts.append(part)
    return parts
