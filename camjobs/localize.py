"""From a class activation map to what a labeler sees: upsampled map, heatmap PNG, boxes.

The box rule (Zhou et al. 2015, section 3): upsample the map M to the image's own size
(bilinear, align_corners=False) giving U; keep {U >= T * max U} (T = 0.2 by default;
nothing when max U <= 0); split it into 8-connected components; one box per component,
largest area first, so boxes[0] is the paper's box (its largest connected component).

Box coordinates are absolute pixels of the original image in torchvision's xyxy
convention: 0 <= x_min < x_max <= width, with x_max and y_max exclusive.
A box's score is the mean of U / max U over the component's pixels, in (T, 1]:
how strongly, on average, the model looked at that region compared to its peak.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_THRESHOLD = 0.2


@dataclass(frozen=True)
class Box:
    x_min: float
    y_min: float
    x_max: float
    y_max: float
    score: float

    def as_dict(self) -> dict:
        return {"x_min": self.x_min, "y_min": self.y_min, "x_max": self.x_max, "y_max": self.y_max, "score": self.score}


def upsample(cam: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear upsampling (align_corners=False) of an (h, w) map to (height, width)."""
    return F.interpolate(cam[None, None].float(), size=(height, width), mode="bilinear", align_corners=False)[0, 0]


def normalized(upsampled: torch.Tensor) -> torch.Tensor:
    """U / max U clipped to [0, 1]; all zeros when max U <= 0 (no positive evidence)."""
    peak = upsampled.max()
    if not torch.isfinite(peak) or peak <= 0:
        return torch.zeros_like(upsampled)
    return (upsampled / peak).clamp_(0.0, 1.0)


def heatmap_uint8(norm: torch.Tensor) -> np.ndarray:
    """round(255 * U / max U), half up, as uint8: heatmap >= 51 is the 20% region."""
    return torch.floor(norm * 255.0 + 0.5).to(torch.uint8).cpu().numpy()


def encode_png(image: np.ndarray, compression: int = 1) -> bytes:
    ok, buffer = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buffer.tobytes()


def boxes_from_normalized(norm: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> list[Box]:
    """One box per 8-connected component of {norm >= threshold}, largest area first."""
    # An all-zero norm means max U <= 0: no region, hence no box.
    if not bool((norm > 0).any()):
        return []
    region = (norm >= threshold).to(torch.uint8).cpu().numpy()
    count, labels, stats, _ = cv2.connectedComponentsWithStats(region, connectivity=8)
    if count <= 1:
        return []
    areas = stats[1:, cv2.CC_STAT_AREA]
    sums = np.bincount(labels.ravel(), weights=norm.cpu().numpy().ravel().astype(np.float64), minlength=count)[1:]
    boxes = []
    # Stable sort: equal areas keep OpenCV's raster-scan order, so output is deterministic.
    for index in np.argsort(-areas, kind="stable"):
        x, y, w, h = (int(v) for v in stats[index + 1, :4])
        boxes.append(Box(float(x), float(y), float(x + w), float(y + h), float(sums[index] / areas[index])))
    return boxes


@dataclass
class Localization:
    heatmap: np.ndarray  # (height, width) uint8
    boxes: list[Box]


def localize(cam: torch.Tensor, height: int, width: int, threshold: float = DEFAULT_THRESHOLD) -> Localization:
    """Upsample one raw map to the image's size, then its heatmap and boxes."""
    norm = normalized(upsample(cam, height, width))
    return Localization(heatmap=heatmap_uint8(norm), boxes=boxes_from_normalized(norm, threshold))
