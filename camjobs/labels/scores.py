"""Score sources of ``camjobs evaluate``: one accumulator per thing being scored.

As detectron2's DatasetEvaluators or mmengine's BaseMetric: a source's ``add(sample)`` scores
one image against its ground truth and keeps the sums (a ``Tally``), ``result()`` gives its
metrics. ``CamEvaluator`` feeds the same images to every source, so a new baseline is a new
source, not another branch in every metric. Sources: the CAM (a score map, swept over
thresholds), and, with nothing to sweep, the refined labels of a ``--refine`` run, the Otsu
lesion mask, the centre box and the constant map. Every rule is in ``camjobs.labels.evaluate``'s
module docstring; the arithmetic is ``camjobs.labels.metrics``. No torch, no Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any

import numpy as np

from camjobs.config import DEFAULT_THRESHOLD
from camjobs.errors import UsageError
from camjobs.geometry import XYXY, centre_box, mask_box, mask_jaccard, resize_mask
from camjobs.labels.metrics import (
    CAM_CURVE_INTERVAL,
    CAM_THRESHOLDS,
    IOU_THRESHOLDS,
    ISIC_JACCARD_CUTOFF,
    MAX_BOX_ACC_IOU,
    PXAP_EDGES,
    PrCurve,
    best_ious,
    binary_histograms,
    box_region,
    contour_boxes,
    eval_grid,
    mask_to_grid,
    normalize_scoremap,
    percent,
    pixel_histograms,
    pr_curve,
    run_region,
)

DEFAULT_MAX_SIDE = 1024
METRIC_KEYS = (
    "max_box_acc",
    "max_box_acc_v2",
    "pxap",
    "top1_loc",
    "gt_known_loc",
    "mean_iou",
    "iou50_share",
    "jaccard_mean",
    "jaccard_isic2018",
)


class EvaluationError(UsageError, ValueError):
    """The output, the ground truth or the options do not allow an evaluation."""


@dataclass
class GroundTruth:
    boxes: list[tuple[float, float, float, float]]  # xyxy, max exclusive, original pixels
    mask: np.ndarray | None = None  # bool, height x width


@dataclass
class Refinement:
    """A ``--refine`` row's labels: refined_boxes (largest first) and its decoded mask_rle."""

    boxes: list[XYXY]
    mask: np.ndarray | None  # bool; None: the row has no mask (its map was empty or flat)


@dataclass
class Sample:
    """One image as every source sees it: size, ground truth, the row's inputs, the sweep's grid."""

    image_id: str
    width: int
    height: int
    truth: GroundTruth
    grid: tuple[int, int]  # (width, height) of the sweep metrics' grid
    cam: np.ndarray | None = None  # the raw map, cam_height x cam_width
    threshold: float = DEFAULT_THRESHOLD
    first_box: XYXY | None = None  # the run's boxes[0] at threshold
    refined: Refinement | None = None  # None: the row was not refined
    rgb: np.ndarray | None = None  # the image's pixels (any size); None: not read
    label: str | None = None
    pred_label: str | None = None
    target_label: str | None = None

    @cached_property
    def truth_boxes(self) -> np.ndarray:
        return np.asarray(self.truth.boxes, dtype=np.float64).reshape(-1, 4)

    @cached_property
    def grid_mask(self) -> np.ndarray | None:
        """The ground-truth mask on the sweep's grid (PxAP); None without a mask."""
        return None if self.truth.mask is None else mask_to_grid(self.truth.mask, *self.grid)

    @property
    def downscaled(self) -> bool:
        return self.grid != (self.width, self.height)

    @property
    def labels(self) -> tuple[bool, bool, bool]:
        """(labelled, classified correctly, map of the ground-truth class): top-1 and GT-known Loc."""
        labelled = self.label is not None
        return labelled, labelled and self.pred_label == self.label, labelled and self.target_label == self.label


class Tally:
    """The sums behind one source's metrics; ``steps`` is the sweep's length (1: nothing to sweep)."""

    def __init__(self, steps: int = 1):
        bins = len(PXAP_EDGES) - 1
        self.largest_hits = {iou: np.zeros(steps) for iou in IOU_THRESHOLDS}
        self.any_hits = {iou: np.zeros(steps) for iou in IOU_THRESHOLDS}
        self.positive, self.negative = np.zeros(bins), np.zeros(bins)
        self.ious: list[float] = []  # of boxes[0], per image
        self.jaccards: list[float] = []  # per image with a mask
        self.hits50: list[np.ndarray] = []  # per image: largest box hit at IoU 0.5, per step
        self.labels: list[tuple[bool, bool, bool]] = []

    @property
    def images(self) -> int:
        return len(self.ious)

    def add(
        self,
        sample: Sample,
        largest_iou: np.ndarray,
        any_iou: np.ndarray,
        first_iou: float,
        pixels: tuple[np.ndarray, np.ndarray] | None = None,
        jaccard: float | None = None,
    ) -> None:
        """One image: IoUs per step (largest box, best box), boxes[0]'s IoU, PxAP's counts, the Jaccard."""
        for iou in IOU_THRESHOLDS:
            self.largest_hits[iou] += largest_iou >= iou
            self.any_hits[iou] += any_iou >= iou
        self.hits50.append(largest_iou >= MAX_BOX_ACC_IOU)
        self.ious.append(float(first_iou))
        self.labels.append(sample.labels)
        if pixels is not None:
            self.positive += pixels[0]
            self.negative += pixels[1]
        if jaccard is not None:
            self.jaccards.append(float(jaccard))

    def box_acc(self, largest: bool) -> dict[float, np.ndarray]:
        """BoxAcc (percent) per step for each IoU threshold: of the largest box, or of any box."""
        hits = self.largest_hits if largest else self.any_hits
        return {iou: 100.0 * counts / self.images for iou, counts in hits.items()}

    def best_step(self) -> int:
        """MaxBoxAcc's step (the first that attains it): GT-known and top-1 Loc are read there."""
        return int(np.argmax(self.largest_hits[MAX_BOX_ACC_IOU]))

    def curve(self) -> PrCurve | None:
        """The pixel precision-recall curve; None where no image with a mask was scored."""
        return pr_curve(self.positive, self.negative) if self.jaccards else None

    def metrics(self) -> dict[str, float | None]:
        """METRIC_KEYS, in percent; every one None where the source scored no image."""
        n = self.images
        if not n:
            return dict.fromkeys(METRIC_KEYS)
        best = self.best_step()
        hits = np.array(self.hits50, dtype=bool).reshape(n, -1)[:, best]
        labelled, correct, known = np.array(self.labels, dtype=bool).reshape(n, 3).T
        ious, jaccards = np.array(self.ious), np.array(self.jaccards)
        curve = self.curve()
        return {
            "max_box_acc": float(self.box_acc(True)[MAX_BOX_ACC_IOU][best]),
            "max_box_acc_v2": float(np.mean([acc.max() for acc in self.box_acc(False).values()])),
            "pxap": curve.pxap if curve else None,
            "top1_loc": percent(np.count_nonzero(hits & correct), int(labelled.sum())),
            "gt_known_loc": percent(np.count_nonzero(hits & known), int(known.sum())),
            "mean_iou": 100.0 * float(ious.mean()),
            "iou50_share": percent(np.count_nonzero(ious >= MAX_BOX_ACC_IOU), n),
            "jaccard_mean": percent(float(jaccards.sum()), jaccards.size),
            "jaccard_isic2018": percent(float(jaccards[jaccards >= ISIC_JACCARD_CUTOFF].sum()), jaccards.size),
        }


class ScoreSource:
    """One thing scored against the ground truth: ``add`` an image, then ``result()``."""

    name = ""  # short name: details.pr_curves' key, counts' <name>_images
    key: str | None = None  # its block in metrics.json (None: the top level)
    title = ""  # its column in metrics.md
    columns: tuple[str, ...] = ()  # its per_image.csv columns

    def __init__(self, steps: int = 1):
        self.tally = Tally(steps)
        self.skipped = 0  # images this source could not score (no pixels, not refined)

    def add(self, sample: Sample) -> dict[str, Any]:
        """Score one image; its per_image.csv values (of ``columns``; none where it was skipped)."""
        raise NotImplementedError

    def result(self) -> dict[str, Any]:
        return self.tally.metrics()

    def counts(self) -> dict[str, int]:
        """What metrics.json's counts reports of this source: the images it scored."""
        return {f"{self.name}_images": self.tally.images}


@dataclass
class Prediction:
    """A source's answer with no threshold to sweep: boxes, largest first, and a binary map."""

    boxes: np.ndarray  # (n, 4) xyxy in original pixels; (0, 4): no box
    mask: np.ndarray | None = None  # bool (height, width); None: the pixels of boxes[0]

    @classmethod
    def of_mask(cls, mask: np.ndarray | None, width: int, height: int) -> Prediction:
        """A mask and its one box (mask_box); None counts as an empty mask with no box."""
        if mask is None:
            mask = np.zeros((height, width), bool)
        box = mask_box(mask)
        return cls(_box_array([box] if box else []), mask)

    def region(self, width: int, height: int, grid: tuple[int, int] | None = None) -> np.ndarray:
        """The binary map at the image's size, or on the sweep's grid (PxAP)."""
        grid_width, grid_height = grid or (width, height)
        if self.mask is not None:
            return mask_to_grid(self.mask, grid_width, grid_height)
        if not len(self.boxes):
            return np.zeros((grid_height, grid_width), bool)
        return box_region(self.boxes[0], width, height, grid_width, grid_height)


def _box_array(boxes: Sequence[XYXY]) -> np.ndarray:
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


class BinarySource(ScoreSource):
    """A source with nothing to sweep: every threshold sees the same boxes and binary map.

    MaxBoxAcc(V2), top-1 and GT-known Loc use its boxes at every step (boxes[0] as the largest,
    every box for V2), mean IoU and the IoU >= 0.5 share use boxes[0], PxAP and the Jaccard the
    binary map.
    """

    box_column: str | None = None
    jaccard_column: str | None = None

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(c for c in (self.box_column, self.jaccard_column) if c)

    def predict(self, sample: Sample) -> Prediction | None:
        """This image's prediction; None: the source cannot score it (counted as skipped)."""
        raise NotImplementedError

    def add(self, sample: Sample) -> dict[str, Any]:
        prediction = self.predict(sample)
        if prediction is None:
            self.skipped += 1
            return {}
        ious = best_ious(prediction.boxes, sample.truth_boxes)
        first = float(ious[0]) if ious.size else 0.0
        best = float(ious.max()) if ious.size else 0.0
        pixels = jaccard = None
        if sample.truth.mask is not None:
            pixels = binary_histograms(prediction.region(sample.width, sample.height, sample.grid), sample.grid_mask)
            jaccard = mask_jaccard(prediction.region(sample.width, sample.height), sample.truth.mask)
        self.tally.add(sample, np.array([first]), np.array([best]), first, pixels, jaccard)
        values = {self.box_column: first, self.jaccard_column: jaccard}
        return {column: value for column, value in values.items() if column}


class FixedBoxSource(BinarySource):
    """A box fixed by the image's size alone (the centre box, the whole image)."""

    def __init__(self, name: str, key: str, title: str, box: Callable[[int, int], XYXY], box_column: str | None = None):
        super().__init__()
        self.name, self.key, self.title, self.box, self.box_column = name, key, title, box, box_column

    def predict(self, sample: Sample) -> Prediction:
        return Prediction(_box_array([self.box(sample.width, sample.height)]))

    def counts(self) -> dict[str, int]:
        return {}  # every image, always


class OtsuSource(BinarySource):
    """The image-only lesion baseline: ``camjobs.segment.otsu_lesion_mask`` of the image's pixels."""

    name, key, title = "otsu", "otsu_baseline", "Otsu lesion mask"
    box_column, jaccard_column = "otsu_box_iou", "otsu_jaccard"

    def predict(self, sample: Sample) -> Prediction | None:
        from camjobs.segment import otsu_lesion_mask

        if sample.rgb is None:
            return None
        return Prediction.of_mask(
            otsu_lesion_mask(sample.rgb, sample.width, sample.height), sample.width, sample.height
        )


class RefinedSource(BinarySource):
    """The labels a ``--refine`` run wrote: refined_boxes and the mask_rle mask."""

    name, key, title = "refined", "refined", "refined (--refine)"
    box_column, jaccard_column = "refined_box_iou", "refined_jaccard"

    def __init__(self):
        super().__init__()
        self.mask_resized = 0

    def predict(self, sample: Sample) -> Prediction | None:
        refined = sample.refined
        if refined is None:
            return None
        if refined.mask is None:  # an empty or flat map: no box, no mask
            return Prediction.of_mask(None, sample.width, sample.height)
        mask = refined.mask
        if mask.shape != (sample.height, sample.width):
            mask = resize_mask(mask, sample.width, sample.height)
            self.mask_resized += 1
        return Prediction(_box_array(refined.boxes), mask)

    def counts(self) -> dict[str, int]:
        return {**super().counts(), "refined_mask_resized": self.mask_resized}


class CamSource(ScoreSource):
    """The class activation map: swept over CAM_THRESHOLDS, and the run's own boxes[0] and region."""

    name, key, title = "cam", None, "CAM"
    columns = ("first_box_iou", "jaccard")

    def __init__(self):
        super().__init__(len(CAM_THRESHOLDS))
        self.largest_iou: list[np.ndarray] = []  # per image, per threshold (per_image.csv)
        self.no_box = 0  # images whose run found no box

    def add(self, sample: Sample) -> dict[str, Any]:
        from camjobs.pipeline.localize import upsample

        raw = np.ascontiguousarray(sample.cam, dtype=np.float32)
        grid_width, grid_height = sample.grid
        upsampled = upsample(raw, grid_height, grid_width)
        scoremap = normalize_scoremap(upsampled)
        largest_iou, any_iou = self._sweep(scoremap, sample)
        first = sample.first_box
        first_iou = float(best_ious(_box_array([first]), sample.truth_boxes)[0]) if first is not None else 0.0
        pixels = jaccard = None
        if sample.truth.mask is not None:
            pixels = pixel_histograms(scoremap, sample.grid_mask)
            full = upsample(raw, sample.height, sample.width) if sample.downscaled else upsampled
            jaccard = mask_jaccard(run_region(full, sample.threshold), sample.truth.mask)
        self.tally.add(sample, largest_iou, any_iou, first_iou, pixels, jaccard)
        self.largest_iou.append(largest_iou.astype(np.float32))
        self.no_box += first is None
        return {"first_box_iou": first_iou, "jaccard": jaccard}

    @staticmethod
    def _sweep(scoremap: np.ndarray, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """Per threshold, the best IoU of the largest contour's box and of any contour's box."""
        width, height = sample.width, sample.height
        grid_width, grid_height = sample.grid
        scale = np.array([width / grid_width, height / grid_height] * 2)
        largest_iou, any_iou = np.zeros(len(CAM_THRESHOLDS)), np.zeros(len(CAM_THRESHOLDS))
        cache: dict[int, tuple[float, float]] = {}  # equal regions share one step object
        for index, step in enumerate(contour_boxes(scoremap)):
            if step is None:
                continue
            if id(step) not in cache:
                boxes = step.boxes * scale if sample.downscaled else step.boxes.astype(np.float64)
                ious = best_ious(boxes, sample.truth_boxes)
                cache[id(step)] = (float(ious[step.largest]), float(ious.max()))
            largest_iou[index], any_iou[index] = cache[id(step)]
        return largest_iou, any_iou

    def details(self) -> dict[str, Any]:
        """metrics.json's details of the sweep: best thresholds, BoxAcc curves, the plain Jaccard."""
        largest, any_box = self.tally.box_acc(True), self.tally.box_acc(False)
        jaccards = self.tally.jaccards
        return {
            "best_threshold": float(CAM_THRESHOLDS[self.tally.best_step()]),
            "box_acc_v2_by_iou": {str(iou): float(any_box[iou].max()) for iou in IOU_THRESHOLDS},
            "best_thresholds_v2": {
                str(iou): float(CAM_THRESHOLDS[int(np.argmax(any_box[iou]))]) for iou in IOU_THRESHOLDS
            },
            "jaccard_mean": percent(sum(jaccards), len(jaccards)),
            "box_acc_curves": {
                "thresholds": [round(float(t), 2) for t in CAM_THRESHOLDS],
                "largest_contour": {str(iou): largest[iou].tolist() for iou in IOU_THRESHOLDS},
                "all_contours": {str(iou): any_box[iou].tolist() for iou in IOU_THRESHOLDS},
            },
        }

    def largest_iou_at_best(self) -> list[float]:
        """Per image, the largest contour's IoU at MaxBoxAcc's threshold."""
        best = self.tally.best_step()
        return [float(ious[best]) for ious in self.largest_iou]


def default_sources() -> list[ScoreSource]:
    """The sources reported beside the CAM, in metrics.md's column order."""
    return [
        RefinedSource(),
        OtsuSource(),
        FixedBoxSource("centre", "centre_baseline", "centre box", partial(centre_box, frac=0.5), "centre_box_iou"),
        FixedBoxSource(
            "constant",
            "constant_baseline",
            "constant map",
            lambda width, height: (0.0, 0.0, float(width), float(height)),
        ),
    ]


@dataclass
class _Counts:
    evaluated: int = 0
    with_mask: int = 0
    labelled: int = 0
    gt_known_images: int = 0
    downscaled: int = 0


class CamEvaluator:
    """Feeds one image at a time to the CAM and every other source; ``result()`` is metrics.json."""

    def __init__(self, max_side: int | None = DEFAULT_MAX_SIDE, sources: Sequence[ScoreSource] | None = None):
        self.max_side = max_side
        self.cam = CamSource()
        self.sources: list[ScoreSource] = [self.cam, *(default_sources() if sources is None else sources)]
        self.thresholds: set[float] = set()
        self.counts = _Counts()
        self.per_image: list[dict[str, Any]] = []

    @property
    def images(self) -> int:
        return self.counts.evaluated

    def add(
        self,
        cam: np.ndarray,
        width: int,
        height: int,
        truth: GroundTruth,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        first_box: XYXY | None = None,
        label: str | None = None,
        pred_label: str | None = None,
        target_label: str | None = None,
        image_id: str = "",
        refined: Refinement | None = None,
        rgb: np.ndarray | None = None,
    ) -> None:
        """Add one raw map (cam_height x cam_width) of a width x height image with its ground truth.

        ``first_box`` is the run's ``boxes[0]`` (None: the run found no box) at ``threshold``;
        ``refined`` the row's refined labels (None: not refined); ``rgb`` the image's pixels at
        any size, for the Otsu baseline (None: that baseline skips the image).
        """
        if not truth.boxes:
            raise ValueError("ground truth without a box")
        width, height = int(width), int(height)
        if truth.mask is not None and truth.mask.shape != (height, width):
            raise ValueError(f"mask is {truth.mask.shape[1]}x{truth.mask.shape[0]}, image {width}x{height}")
        truth = GroundTruth(truth.boxes, None if truth.mask is None else np.asarray(truth.mask, dtype=bool))
        sample = Sample(
            image_id,
            width,
            height,
            truth,
            eval_grid(width, height, self.max_side),
            cam,
            float(threshold),
            first_box,
            refined,
            rgb,
            label,
            pred_label,
            target_label,
        )
        row: dict[str, Any] = {"image_id": image_id, "width": width, "height": height}
        for source in self.sources:
            row.update(dict.fromkeys(source.columns))
            row.update(source.add(sample))
        row.update(label=label, pred_label=pred_label, target_label=target_label)
        self.per_image.append(row)
        self._count(sample)

    def _count(self, sample: Sample) -> None:
        labelled, _, known = sample.labels
        self.thresholds.add(round(sample.threshold, 6))
        self.counts.evaluated += 1
        self.counts.with_mask += sample.truth.mask is not None
        self.counts.labelled += labelled
        self.counts.gt_known_images += known
        self.counts.downscaled += sample.downscaled

    def result(self) -> dict[str, Any]:
        """metrics.json's content: the CAM's metrics, a block per source, counts, details, settings."""
        if not self.images:
            raise EvaluationError("no image with ground truth to evaluate")
        others = self.sources[1:]
        metrics: dict[str, Any] = self.cam.result()
        metrics.update({source.key: source.result() for source in others})
        metrics["counts"] = {**vars(self.counts), "no_box_at_run_threshold": self.cam.no_box}
        for source in others:
            metrics["counts"].update(source.counts())
        curves = {source.name: source.tally.curve() for source in self.sources}
        metrics["details"] = {
            **self.cam.details(),
            "pr_curves": {name: c and c.as_dict() for name, c in curves.items()} if self.counts.with_mask else None,
        }
        metrics["settings"] = {
            "cam_curve_interval": CAM_CURVE_INTERVAL,
            "iou_thresholds": list(IOU_THRESHOLDS),
            "max_side": self.max_side,
            "run_thresholds": sorted(self.thresholds),
            "isic_jaccard_cutoff": ISIC_JACCARD_CUTOFF,
            "sources": [{"name": s.name, "key": s.key, "title": s.title} for s in self.sources],
        }
        for row, iou in zip(self.per_image, self.cam.largest_iou_at_best()):
            row["largest_box_iou_at_best_threshold"] = iou
        return metrics


def source_blocks(metrics: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, title, its metrics) for each source of a metrics.json, the CAM first."""
    return [
        (source["name"], source["title"], metrics if source["key"] is None else metrics[source["key"]])
        for source in metrics["settings"]["sources"]
    ]
