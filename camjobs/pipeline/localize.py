"""From a class activation map to what a labeler sees: upsampled map, heatmap PNG, boxes.

The box rule (Zhou et al. 2015, section 3): upsample the map M to the image's own size
(bilinear, align_corners=False) giving U; keep {U >= T * max U} (T = 0.2 by default;
nothing when max U <= 0); split it into 8-connected components; one box per component,
largest area first, so boxes[0] is the paper's box (its largest connected component).

Box coordinates are absolute pixels of the original image in torchvision's xyxy
convention: 0 <= x_min < x_max <= width, with x_max and y_max exclusive.
A box's score is the mean of U / max U over the component's pixels, in (T, 1]:
how strongly, on average, the model looked at that region compared to its peak.

`localize_batch` is the pipeline's localize stage: it runs as CPU tasks after the model
actors, so the per-pixel work at the image's full size (upsampling, PNG, components) never
holds up a GPU. It needs numpy and OpenCV only: the processes that run it never import torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import pyarrow as pa

from camjobs.config import DEFAULT_THRESHOLD
from camjobs.geometry import Box, component_boxes, component_stats, rle_encode
from camjobs.segment import REFINE_SIDE, refine, work_size

# SUB filtering suits a smooth upsampled map: faster than OpenCV's default choice, and smaller.
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB]


def _numpy(values) -> np.ndarray:
    """An array from a numpy array or a torch tensor (without importing torch)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def upsample(cam, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of an (h, w) map to (height, width), float32.

    Pixel centres are aligned as in torch's interpolate(mode="bilinear", align_corners=False);
    OpenCV computes the same in float, faster on large images, and without torch.
    """
    cam = np.ascontiguousarray(_numpy(cam), dtype=np.float32)
    return cv2.resize(cam, (int(width), int(height)), interpolation=cv2.INTER_LINEAR).reshape(int(height), int(width))


def normalized(upsampled) -> np.ndarray:
    """U / max U clipped to [0, 1]; all zeros when max U <= 0 (no positive evidence)."""
    upsampled = np.asarray(_numpy(upsampled), dtype=np.float32)
    peak = upsampled.max() if upsampled.size else np.float32(0)
    if not np.isfinite(peak) or peak <= 0:
        return np.zeros_like(upsampled)
    norm = upsampled / peak
    return np.clip(norm, 0.0, 1.0, out=norm)


def heatmap_uint8(norm) -> np.ndarray:
    """round(255 * U / max U), half up, as uint8: heatmap >= 51 is the 20% region."""
    scaled = _numpy(norm).astype(np.float32) * np.float32(255.0)
    scaled += np.float32(0.5)
    return np.floor(scaled, out=scaled).astype(np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", image, _PNG_PARAMS)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buffer.tobytes()


def boxes_from_normalized(norm, threshold: float = DEFAULT_THRESHOLD) -> list[Box]:
    """One box per 8-connected component of {norm >= threshold}, largest area first."""
    norm = np.ascontiguousarray(_numpy(norm))
    # An all-zero norm means max U <= 0: no region, hence no box (even at threshold 0).
    if norm.size == 0 or not norm.max() > 0:
        return []
    return [
        Box(float(x), float(y), float(x + w), float(y + h), float(score))
        for x, y, w, h, _area, score in component_stats(norm >= threshold, norm)
    ]


@dataclass
class Localization:
    heatmap: np.ndarray  # (height, width) uint8
    boxes: list[Box]


def localize(cam, height: int, width: int, threshold: float = DEFAULT_THRESHOLD) -> Localization:
    """Upsample one raw map (array or tensor) to the image's size, then its heatmap and boxes."""
    norm = normalized(upsample(cam, height, width))
    return Localization(heatmap=heatmap_uint8(norm), boxes=boxes_from_normalized(norm, threshold))


def shrink_heatmap(heatmap: np.ndarray, max_side: int | None) -> np.ndarray:
    """The heatmap scaled down (area averaging) so that its longer side is at most max_side."""
    height, width = heatmap.shape
    if not max_side or max(height, width) <= max_side:
        return heatmap
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(heatmap, size, interpolation=cv2.INTER_AREA)


def refined_row(work_rgb: np.ndarray, cam: np.ndarray, norm: np.ndarray) -> tuple[dict | None, list[dict] | None]:
    """The refinement of one row (segment.refine): its mask as COCO RLE and the boxes of the
    mask's components (largest first, scored by the map U / max U, `norm`, as boxes are);
    (None, None) where the map is empty or flat or the image shows no lesion."""
    work_height, work_width = work_rgb.shape[:2]
    height, width = norm.shape
    mask = refine(work_rgb, normalized(upsample(cam, work_height, work_width)), width, height)
    if mask is None:
        return None, None
    return rle_encode(mask), component_boxes(mask, norm)


def localize_batch(table: pa.Table, heatmap_max_side: int | None = None, refine_method: str | None = None) -> pa.Table:
    """The localize stage: fill heatmap_png and boxes of every row that carries a map.

    Takes and returns the model actor's rows (schema.RESULT_SCHEMA); error and skipped rows
    pass through untouched. Each row's own threshold, map shape and image size are used.
    Boxes are always found at the image's full size; the stored heatmap is scaled down where
    its longer side exceeds heatmap_max_side (a 6000 px photograph's heatmap PNG is megabytes).
    With refine_method (camjobs run --refine) each such row also gets mask_rle and
    refined_boxes from its working image (refine_pixels, which is dropped here) and the
    method's name in `refine`; a refinement that fails leaves the row's CAM columns as they
    are, its mask null, and says why in refine_error.
    """
    cams = table.column("cam").combine_chunks()
    if isinstance(cams, pa.ChunkedArray):  # an empty table
        return table
    offsets = cams.offsets.to_numpy()
    values = cams.values.to_numpy(zero_copy_only=False)
    valid = cams.is_valid().to_numpy(zero_copy_only=False)
    columns = {
        name: table.column(name).to_pylist() for name in ("cam_height", "cam_width", "height", "width", "threshold")
    }
    out: dict[str, list] = {
        name: [None] * table.num_rows
        for name in ("heatmap_png", "boxes", "mask_rle", "refined_boxes", "refine", "refine_error", "refine_pixels")
    }
    work_pixels = table.column("refine_pixels").to_pylist() if refine_method else None
    for row in np.flatnonzero(valid):
        start, end = offsets[row], offsets[row + 1]
        cam = values[start:end].reshape(columns["cam_height"][row], columns["cam_width"][row])
        height, width = columns["height"][row], columns["width"][row]
        norm = normalized(upsample(cam, height, width))
        out["heatmap_png"][row] = encode_png(shrink_heatmap(heatmap_uint8(norm), heatmap_max_side))
        out["boxes"][row] = [box.as_dict() for box in boxes_from_normalized(norm, columns["threshold"][row])]
        if refine_method:
            out["refine"][row] = refine_method
            try:
                work_width, work_height = work_size(width, height, REFINE_SIDE)
                work_rgb = np.frombuffer(work_pixels[row], np.uint8).reshape(work_height, work_width, 3)
                out["mask_rle"][row], out["refined_boxes"][row] = refined_row(work_rgb, cam, norm)
            except Exception as exc:  # one image's refinement must not cost its CAM row
                out["refine_error"][row] = f"{type(exc).__name__}: {exc}"
    for name, column in out.items():
        index = table.schema.get_field_index(name)
        table = table.set_column(index, table.schema.field(index), pa.array(column, table.schema.field(index).type))
    return table
