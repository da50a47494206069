"""The report's two plots, drawn with OpenCV (no matplotlib): pixel precision-recall and BoxAcc.

``camjobs evaluate`` writes them as ``pr_curve.png`` and ``box_acc.png`` from metrics.json's
content; each score source (``camjobs.labels.scores``) gets its curve or line.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from camjobs.labels.scores import source_blocks

_W, _H = 1280, 680
_LEFT, _RIGHT, _TOP, _BOTTOM = 100, 420, 70, 90  # the legend goes in the right margin
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_BLUE, _ORANGE, _GREEN, _RED, _GREY, _BLACK = (
    (200, 90, 30),
    (20, 130, 240),
    (60, 160, 40),
    (40, 40, 210),
    (140, 140, 140),
    (0, 0, 0),
)
_PURPLE, _BROWN = (160, 50, 150), (30, 80, 140)


def encode_png(image: np.ndarray) -> bytes:
    """A BGR image as PNG bytes."""
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
        self.image[top : top + label.shape[0], 18 : 18 + label.shape[1]] = label
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
                    q = (
                        a[0] + (b[0] - a[0]) * min(k + 1, steps) / steps,
                        a[1] + (b[1] - a[1]) * min(k + 1, steps) / steps,
                    )
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


_STYLES = {
    "cam": (_BLUE, "solid"),
    "refined": (_PURPLE, "solid"),
    "otsu": (_BROWN, "solid"),
    "centre": (_ORANGE, "solid"),
    "constant": (_GREY, "dashed"),
}


def fmt(value: float | None) -> str:
    """A percentage as the report prints it; n/a for a metric that does not apply."""
    return "n/a" if value is None else f"{value:.2f}"


def draw_pr_plot(metrics: dict[str, Any]) -> np.ndarray:
    """Pixel precision-recall curves of the CAM and the other sources (BGR image)."""
    ticks = [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    axes = _Axes("Pixel precision-recall (PxAP)", "recall", "precision", 1.0, 1.0, ticks, ticks)
    curves = metrics["details"].get("pr_curves")
    if not curves:
        axes.text("no masks: PxAP needs lesion masks", ((axes.x0 + axes.x1) // 2, _H // 2), scale=0.7, align="centre")
        return axes.image
    for name, title, block in reversed(source_blocks(metrics)):  # the CAM drawn last, on top
        curve = curves.get(name)
        if curve:
            colour, style = _STYLES.get(name, (_BLACK, "dotted"))
            xs, ys = _steps(np.array(curve["recall"]), np.array(curve["precision"]))
            axes.line(xs, ys, colour, f"{title}: PxAP {fmt(block['pxap'])}", style)
    axes.draw_legend()
    counts = metrics["counts"]
    axes.notes(
        [
            f"{counts['with_mask']} images with masks, pixels pooled.",
            "Precision and recall of the pixels with",
            "normalized CAM >= t, for t = 1, 0.99, ..., 0;",
            "binary maps: the pixels they cover.",
            "PxAP: the area under the steps (x100).",
        ]
    )
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
    axes = _Axes(
        "BoxAcc against the CAM threshold",
        "CAM threshold",
        "BoxAcc (%)",
        1.0,
        100.0,
        [0, 0.2, 0.4, 0.6, 0.8, 1.0],
        [0, 20, 40, 60, 80, 100],
    )
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
    for name, title, block in source_blocks(metrics)[1:]:  # nothing to sweep: one level each
        level = block["max_box_acc"]
        if level is not None:
            colour = _STYLES.get(name, (_BLACK, "dotted"))[0]
            axes.line([0, 1], [level, level], colour, f"{title}, IoU 0.5: {level:.1f}", "dotted")
    axes.draw_legend()
    axes.notes(
        [
            f"{metrics['counts']['evaluated']} images; circles mark the maxima.",
            f"MaxBoxAcc: {metrics['max_box_acc']:.2f} at threshold {metrics['details']['best_threshold']:.2f}.",
            f"MaxBoxAccV2: {metrics['max_box_acc_v2']:.2f}, the mean of the",
            "three all-contour maxima.",
        ]
    )
    return axes.image
