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
_IOU_COLOURS = (("0.3", _GREEN), ("0.5", _BLUE), ("0.7", _RED))  # the CAM's BoxAcc curves, by IoU


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
        self.legend: list[tuple[str, tuple, tuple[int, int]]] = []

    def point(self, x: float, y: float) -> tuple[int, int]:
        px = self.x0 + (self.x1 - self.x0) * min(max(x / self.xmax, 0.0), 1.0)
        py = self.y0 - (self.y0 - self.y1) * min(max(y / self.ymax, 0.0), 1.0)
        return int(round(px)), int(round(py))

    def text(self, text: str, origin, scale=0.5, thickness=1, colour=_BLACK, align="left"):
        (tw, _), _ = cv2.getTextSize(text, _FONT, scale, thickness)
        x = origin[0] - (tw if align == "right" else tw // 2 if align == "centre" else 0)
        cv2.putText(self.image, text, (int(x), int(origin[1])), _FONT, scale, colour, thickness, cv2.LINE_AA)

    def line(self, xs, ys, colour, label: str | None = None, layer: tuple[int, int] = (0, 1), thickness: int = 2):
        """A curve drawn on its layer's share of the plot's dash cycle (_layer_dashes): draw layers 0, 1, ...
        in order, and where curves lie on top of each other each one still shows in its own slot."""
        points = [self.point(x, y) for x, y in zip(xs, ys)]
        for a, b in _layer_dashes(points, *layer):
            cv2.line(self.image, a, b, colour, thickness, cv2.LINE_8)
        if label:
            self.legend.append((label, colour, layer))

    def marker(self, x: float, y: float, colour):
        cv2.circle(self.image, self.point(x, y), 6, colour, 2, cv2.LINE_AA)

    def draw_legend(self):
        """The legend, in the right margin, level with the top of the plot."""
        if not self.legend:
            return
        width = max(cv2.getTextSize(label, _FONT, 0.5, 1)[0][0] for label, _, _ in self.legend) + _LEGEND_SAMPLE + 30
        height = 26 * len(self.legend) + 12
        x, y = self.x1 + 20, self.y1
        cv2.rectangle(self.image, (x, y), (x + width, y + height), (255, 255, 255), -1)
        cv2.rectangle(self.image, (x, y), (x + width, y + height), _GREY, 1)
        for k, (label, colour, layer) in enumerate(self.legend):
            cy = y + 20 + 26 * k
            for a, b in _layer_dashes([(x + 10, cy - 4), (x + 10 + _LEGEND_SAMPLE, cy - 4)], *layer):
                cv2.line(self.image, a, b, colour, 2, cv2.LINE_8)
            cv2.putText(self.image, label, (x + 20 + _LEGEND_SAMPLE, cy), _FONT, 0.5, _BLACK, 1, cv2.LINE_AA)
        self.legend_bottom = y + height

    def notes(self, lines: list[str]):
        """Lines of text in the right margin, below the legend."""
        y = getattr(self, "legend_bottom", self.y1) + 30
        for k, line in enumerate(lines):
            cv2.putText(self.image, line, (self.x1 + 22, y + 22 * k), _FONT, 0.45, (60, 60, 60), 1, cv2.LINE_AA)


_COLOURS = {"cam": _BLUE, "refined": _PURPLE, "otsu": _BROWN, "centre": _ORANGE, "constant": _GREY}  # by source
_SLOT = 6  # pixels of arc length per slot of the dash cycle
_LEGEND_SAMPLE = 60


def _layer_dashes(points: list[tuple[int, int]], layer: int, layers: int) -> list[tuple[tuple, tuple]]:
    """The pieces of a polyline that layer `layer` of `layers` draws: along the line's arc length, cycles of
    `layers` slots, of which it covers slots layer .. layers-1. Layer 0 is solid, each later one shorter
    dashes that start a slot later; drawn in order, slot k of every cycle shows layer k's colour where
    the curves coincide (every curve visible), and a curve on its own reads as its own dash style."""
    pieces, travelled, cycle = [], 0.0, _SLOT * layers
    for a, b in zip(points, points[1:]):
        length = math.hypot(b[0] - a[0], b[1] - a[1])
        start = 0.0
        while start < length:
            phase = (travelled + start) % cycle
            gap = phase < layer * _SLOT  # in the slots of the layers below
            step = min(length - start, (layer * _SLOT - phase) if gap else (cycle - phase))
            if not gap:
                p, q = start / length, (start + step) / length
                pieces.append((_lerp(a, b, p), _lerp(a, b, q)))
            start += max(step, 1e-6)
        travelled += length
    return pieces


def _lerp(a: tuple[int, int], b: tuple[int, int], t: float) -> tuple[int, int]:
    return int(round(a[0] + (b[0] - a[0]) * t)), int(round(a[1] + (b[1] - a[1]) * t))


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
    drawn = [(name, title, block) for name, title, block in source_blocks(metrics) if curves.get(name)]
    for k, (name, title, block) in enumerate(drawn):  # the CAM first, solid; each other source a layer above
        xs, ys = _steps(np.array(curves[name]["recall"]), np.array(curves[name]["precision"]))
        axes.line(xs, ys, _COLOURS.get(name, _BLACK), f"{title}: PxAP {fmt(block['pxap'])}", (k, len(drawn)))
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
    levels = [(name, title, block["max_box_acc"]) for name, title, block in source_blocks(metrics)[1:]]
    levels = [(name, title, level) for name, title, level in levels if level is not None]
    lines = [(f"all contours, IoU {iou}", colour, curves["all_contours"][iou]) for iou, colour in _IOU_COLOURS]
    lines.append(("largest contour, IoU 0.5 (MaxBoxAcc)", _BLACK, curves["largest_contour"]["0.5"]))
    layers = len(lines) + len(levels)
    for k, (title, colour, values) in enumerate(lines):  # the CAM's BoxAcc at each threshold
        best = int(np.argmax(values))
        axes.line(thresholds, values, colour, f"{title}: max {values[best]:.1f}", (k, layers))
        axes.marker(thresholds[best], values[best], colour)
    for k, (name, title, level) in enumerate(levels, len(lines)):  # nothing to sweep: one level each
        axes.line([0, 1], [level, level], _COLOURS.get(name, _BLACK), f"{title}, IoU 0.5: {level:.1f}", (k, layers))
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
