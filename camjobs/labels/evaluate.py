"""Localization quality of class activation maps against lesion masks or boxes.

``evaluate_output(OUTPUT, data=... | masks=... | boxes=...)`` reads the rows of ``OUTPUT/cams``,
compares every map with the image's ground truth and writes a report (``OUTPUT/eval/`` by
default): ``metrics.json`` (the metrics below, a block per baseline, ``counts``, ``details``
with the curves, ``settings``), ``metrics.md`` (a table: metric | CAM | refined | Otsu lesion
mask | centre box | constant map), ``per_image.csv``, ``pr_curve.png`` (pixel precision-recall)
and ``box_acc.png`` (BoxAcc against the CAM threshold). The plots are drawn with OpenCV
(``camjobs.labels.eval_plots``). ``CamEvaluator`` (``camjobs.labels.scores``) does the same for maps held in
memory; the metric arithmetic is ``camjobs.labels.metrics``.

Rows: with ``run_id``, that run's rows. Without, the newest run's model and settings
(``model_sha256, method, threshold, target_mode, input_size, refine``: ``schema.SETTINGS_COLUMNS``)
and every row in ``cams/`` with the same, one per image_id (the newest run's): after
``--incremental`` runs that is the whole dataset, and rows of other models or settings are left
out. Files of schema version 1 (no ``mask_rle``, ``refined_boxes``, ``refine``) are read through
``CAMS_SCHEMA``: the missing columns are null, so their rows have no refined labels and their
``refine`` setting is null, as a version-2 run without ``--refine`` writes it.

Score sources. Each thing scored is a source (``camjobs.labels.scores``: one accumulator per source,
``add`` an image, then ``result()``); every source gets every metric below, in its own block of
metrics.json, and null where it scored no image:

- the CAM (top level of metrics.json): a score map, swept over thresholds;
- ``refined``: the labels a ``camjobs run --refine`` run wrote (see "Refined labels");
- ``otsu_baseline``: the Otsu lesion mask of the image alone (see "The Otsu baseline");
- ``centre_baseline`` and ``constant_baseline``: see "Fixed baselines".

Metrics, after Choe et al., "Evaluating Weakly Supervised Object Localization Methods Right"
(CVPR 2020) and their code (github.com/clovaai/wsolevaluation, ``evaluation.py`` and
``inference.py``). All are percentages (0-100).

Score map. The raw map (``cam``, ``cam_height`` x ``cam_width``) is upsampled bilinearly
(align_corners=False, ``camjobs.pipeline.localize.upsample``) to the image's width x height and min-max
normalized to [0, 1] in float64: ``S = (U - min U) / (max U - min U)``.

Threshold sweep. ``tau`` in ``np.arange(0, 1, 0.01)`` (cam_curve_interval 0.01, 100 values).
As wsolevaluation's ``compute_bboxes_from_scoremaps``: ``Q = uint8(255 * S)`` (truncated), the
region at ``tau`` is ``Q > int(tau * max Q)``, its contours are ``cv2.findContours(RETR_TREE,
CHAIN_APPROX_SIMPLE)`` (outer borders and hole borders) and a contour's box is its
``cv2.boundingRect``.

- ``max_box_acc`` (MaxBoxAcc): for each ``tau`` the box of the largest contour (by
  ``cv2.contourArea``; of equal ones the first in findContours' list, as wsolevaluation's
  ``max()``: for separate regions, the one a raster scan meets last); BoxAcc(tau) = share of images whose box has
  IoU >= 0.5 with a ground-truth box; the maximum over ``tau``. ``details.best_threshold`` is the
  first ``tau`` that attains it.
- ``max_box_acc_v2`` (MaxBoxAccV2): every contour's box counts (multi_contour_eval): an image is
  correct at ``tau`` if any of its boxes has IoU >= delta with any ground-truth box; the maximum
  over ``tau`` for each delta in 0.3, 0.5, 0.7 (``details.box_acc_v2_by_iou``), then their mean.
- ``pxap`` (PxAP, needs masks): the values of ``S`` at mask pixels and at non-mask pixels are
  counted, pooled over all images, in the bins ``[0, .01), [.01, .02), ..., [.99, 1), [1, 2),
  [2, 3]`` (np.histogram with edges ``tau + [1, 2, 3]``). Going down the edges (2, 1, .99, ...,
  0), ``TP(e)`` and ``FP(e)`` are the mask and non-mask pixels with ``S >= e`` (reversed
  cumulative sums), precision ``TP / (TP + FP)`` (edges with ``TP + FP = 0`` are left out),
  recall ``TP / #mask pixels``, and ``PxAP = sum_k precision_k * (recall_k - recall_{k-1})``
  over consecutive edges: wsolevaluation's ``MaskEvaluator.compute``, step-wise average
  precision.
- ``gt_known_loc`` (GT-known Loc): at MaxBoxAcc's best threshold, the share of images whose
  largest-contour box has IoU >= 0.5, over the images whose map explains the ground-truth class
  (``target_label == label``; null without labels). With ``camjobs run --target label`` that is
  every labelled image and GT-known Loc equals MaxBoxAcc over them; with the default
  ``--target predicted`` it is the correctly classified images.
- ``top1_loc`` (top-1 Loc): at the same threshold, the share of labelled images that are both
  classified correctly (``pred_label == label``) and localized (IoU >= 0.5).

At the run's own threshold ``T`` (``threshold`` column, 0.2 by default), with camjobs' box rule
(``U >= T * max U``; README, "The box rule"):

- ``mean_iou``: mean IoU (x 100) of the stored ``boxes[0]`` with the ground-truth box (the best
  of several); 0 for an image without a box.
- ``iou50_share``: the share of images whose ``boxes[0]`` has IoU >= 0.5 (no box: a miss).
- ``jaccard_mean`` (needs masks): the plain mean of the Jaccard index of the whole region
  ``{U >= T * max U}`` (every component) with the mask, at the image's own size: per image
  ``J = |R & M| / |R | M|`` (``geometry.mask_jaccard``). ``details.jaccard_mean`` holds the
  same number (it was there first).
- ``jaccard_isic2018`` (needs masks): ISIC 2018 Task 1's thresholded Jaccard: per image ``J``
  if ``J >= 0.65`` else 0, averaged.

Ground truth: a lesion mask (binarized ``> 127``; ``read_mask``) gives one box, the tightest box
around all its pixels (``mask_box``), and the pixels for PxAP and the Jaccard; a COCO file gives
boxes ``[x, y, w, h]`` -> ``(x, y, x + w, y + h)`` (several per image: the best IoU counts) and no
pixels, so PxAP and the Jaccards are null. Images without ground truth, or with an empty mask or
no box, are left out and counted (``counts``). Boxes are xyxy with x_max, y_max exclusive
(camjobs' convention) and IoU is ``box_iou``.

Sources with nothing to sweep (every source but the CAM) give per image some boxes, largest
first, and a binary map. A fixed answer is the same at every threshold, so MaxBoxAcc, GT-known
and top-1 Loc use the first box as every threshold's largest-contour box, MaxBoxAccV2 counts
any of the boxes; mean IoU and the IoU >= 0.5 share use the first box; PxAP and the Jaccards use
the binary map (1 on it, 0 elsewhere; for PxAP on the sweep's grid, see difference 1: a box's
map is the grid pixels whose centre lies in it, a mask is resized like a ground-truth mask).
No box scores IoU 0, an empty map covers nothing.

Fixed baselines, under the same keys:

- ``centre_baseline``: the centre box ``centre_box(width, height, 0.5)`` (the middle half of each
  side, a quarter of the image); its binary map is the pixels whose centre lies in the box.
- ``constant_baseline``: a constant map. Every pixel is at the peak, so the region at every
  threshold is the whole image: the box is the whole image ``(0, 0, width, height)`` for the box
  metrics, and for PxAP every pixel is positive (PxAP = the share of mask pixels, pooled).
  ``CamEvaluator`` treats a constant map exactly like this (see the differences below).

The Otsu baseline (``otsu_baseline``): a lesion mask from the image's pixels alone, no model
(``camjobs.segment.otsu_lesion_mask``): at a working size of longer side at most 512 pixels
(area averaging), grey = OpenCV's RGB -> grey blurred by a Gaussian of sigma 0.01 x the longer
side; foreground = grey <= Otsu's threshold of it (lesions are darker than skin); of its
8-connected components, each scores its area, divided by 4 if it touches the image's border
(vignette corners, shadows), and the best (the first in OpenCV's label order on a tie) is the
mask, resized to the image's size. An image whose grey values are all equal has no mask. Its
box is ``mask_box`` of the mask (one component, so the box around the whole mask); no mask: no
box and an empty map. The pixels come from each row's ``source_path`` (``camjobs.images``:
``read_bytes``, then ``decode_reduced`` with both sides kept at >= 512 where the codec can
shrink, as a JPEG can: the working image is no smaller than it would be from a full decode).
Where the file cannot be read or decoded (moved, deleted, corrupt), or now has another size
than the row's (replaced), the Otsu baseline skips that image: it is scored over the images it
could read (``counts.otsu_images``), and ``counts.image_unreadable`` and
``counts.image_size_changed`` say how many it could not. A missing file is the output's
problem, not the baseline's, so it is not scored as a miss; the CAM and the other sources
still count the image. ``image_baselines=False`` (``camjobs evaluate --no-image-baselines``)
reads no image: the Otsu baseline is null, for outputs whose images are gone.

Refined labels (``refined``): rows of a ``camjobs run --refine`` run (``refine``,
``mask_rle`` or ``refined_boxes`` not null) give their ``refined_boxes`` (largest first) as the
boxes and the mask of ``mask_rle`` (COCO RLE, ``geometry.rle_decode``) as the binary map. A
refined row with a null mask (its map was empty or flat) counts as no box and an empty mask. A
mask of another size than the image is resized (``geometry.resize_mask``;
``counts.refined_mask_resized``). Rows without refinement are left out of this source
(``counts.refined_images`` counts those in): with none, every ``refined`` metric is null.

Differences from wsolevaluation (each deliberate):

1. Resolution. wsolevaluation resizes every image, box and mask to 224 x 224. Here maps are
   compared at the image's own size, so boxes and IoUs are in original pixels. For images whose
   long side exceeds ``max_side`` (1024 by default), the sweep metrics (MaxBoxAcc, MaxBoxAccV2,
   PxAP, GT-known and top-1 Loc) use a downscaled grid of long side ``max_side`` (sizes
   rounded): the raw map is upsampled straight to that grid, the mask is resized to it with
   INTER_AREA and binarized ``> 127``, and boxes found on it are scaled back to original pixels
   before the IoU with the (full-resolution) ground-truth box. Pixels are pooled over images
   for PxAP, so larger images weigh more (wsolevaluation's fixed 224 x 224 weighs every image
   the same); the cap limits this. mean IoU and the Jaccards always use the full size.
2. Upsampling. wsolevaluation resizes the map with bicubic interpolation; here bilinear
   (align_corners=False), the rule camjobs' own heatmaps and boxes use.
3. Box extent and IoU. wsolevaluation makes the box ``(x, y, min(x + w, W - 1), min(y + h, H - 1))``
   and computes IoU with inclusive ``+1`` pixel areas, so its boxes are one pixel wider and
   taller than the contour except at the right and bottom edges. Here the box is the contour's
   exact pixel extent ``(x, y, x + w, y + h)``, max exclusive, and IoU uses plain areas.
4. No region. Where no pixel passes a threshold, wsolevaluation uses the box (0, 0, 0, 0) (one
   pixel, with its +1 convention); here there is no box and the image is not localized at that
   threshold.
5. Constant maps. wsolevaluation's ``normalize_scoremap`` turns a constant (or NaN) map into
   zeros, which has no region at any threshold. Here a constant map becomes all ones (every
   pixel is the peak), so its box is the whole image: the ``constant_baseline``. A map whose
   range is within 1e-6 of its magnitude counts as constant (upsampling a constant map in
   float32 leaves rounding noise, which min-max normalization would stretch to [0, 1]). A map with a
   non-finite value becomes zeros, as in wsolevaluation. PxAP is the same either way.
6. Masks. wsolevaluation's OpenImages masks are ``> 0.5`` after nearest resizing, have several
   instances and an ignore region; here one mask per image, ``> 127``, no ignore region.
7. Boxes from masks. wsolevaluation has ground-truth boxes (CUB, ImageNet); here, from masks,
   the one box around all of a mask's pixels.
8. GT-known Loc. In the paper the map of the ground-truth class is always available; here only
   the stored map's class (``target_label``), so GT-known Loc is over the images where that is
   the ground-truth class (see above).

per_image.csv, a row per image: ``image_id, width, height``; ``first_box_iou`` (the CAM's
``boxes[0]``) and ``jaccard`` (its region at the run's threshold); ``refined_box_iou`` and
``refined_jaccard``; ``otsu_box_iou`` and ``otsu_jaccard``; ``centre_box_iou``; ``label,
pred_label, target_label``; ``largest_box_iou_at_best_threshold`` (the CAM's largest contour at
MaxBoxAcc's threshold). A value that does not apply (no mask; a row without refinement; an
image the Otsu baseline could not read) is empty.

Memory: rows are read with the small columns first (to pick the rows), then streamed in record
batches; one image's maps and pixels are held at a time. Per image, 100 booleans (the
largest-contour hits at IoU 0.5, for GT-known and top-1 Loc at the best threshold, found at
the end) and a few numbers per source are kept.

Modules: this one reads the rows (through ``camjobs.output``) and runs the loop; the ground truth
is ``camjobs.labels.truth``, the score sources ``camjobs.labels.scores``, the metric arithmetic
``camjobs.labels.metrics``, the report ``camjobs.labels.eval_report`` and its plots ``camjobs.labels.eval_plots``. None
of them imports torch or ray: maps are upsampled by ``camjobs.pipeline.localize``, which needs neither.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads

from camjobs.geometry import box_xyxy, rle_decode
from camjobs.labels.eval_report import EvaluationReport, markdown_report, markdown_table, write_report  # noqa: F401 (API)
from camjobs.labels.scores import (  # noqa: F401 (CamEvaluator and its types are this module's API too)
    DEFAULT_MAX_SIDE,
    DEFAULT_THRESHOLD,
    METRIC_KEYS,
    CamEvaluator,
    EvaluationError,
    GroundTruth,
    Refinement,
)
from camjobs.labels.truth import TruthSource
from camjobs.output import NoResults, newest_per_image, open_cams, settings_filter
from camjobs.schema import SETTINGS_COLUMNS
from camjobs.segment import WORK_SIDE

IMAGE_MIN_SIDE = WORK_SIDE  # the image baselines decode with both sides at least this (the Otsu working size)


# --------------------------------------------------------------------------- reading the output
_LIGHT = ("image_id", "run_id", *SETTINGS_COLUMNS)
_HEAVY = (
    "image_id",
    "run_id",
    "source_path",
    "width",
    "height",
    "cam",
    "cam_height",
    "cam_width",
    "boxes",
    "threshold",
    "label",
    "pred_label",
    "target_label",
    "mask_rle",
    "refined_boxes",
    "refine",
)


def _select_rows(dataset: pads.Dataset, run_id: str | None) -> tuple[set[tuple[str, str]], list[str]]:
    """(run_id, image_id) pairs to evaluate, and the runs they come from.

    With run_id: that run's rows. Without: the newest run's model and settings
    (schema.SETTINGS_COLUMNS), every row with them, one per image (newest run).
    """
    table = dataset.to_table(columns=list(_LIGHT))
    if table.num_rows == 0:
        raise EvaluationError("no rows in cams/")
    runs = sorted(set(table["run_id"].drop_null().to_pylist()))
    if run_id is not None:
        if run_id not in runs:
            raise EvaluationError(f"no rows of run {run_id!r} in cams/; runs: {', '.join(runs)}")
        table = table.filter(pc.field("run_id") == run_id)
    else:
        newest = table.filter(pc.field("run_id") == runs[-1]).slice(0, 1).to_pylist()[0]
        table = table.filter(settings_filter({name: newest[name] for name in SETTINGS_COLUMNS}))
    table = newest_per_image(table)
    pairs = set(zip(table["run_id"].to_pylist(), table["image_id"].to_pylist()))
    return pairs, sorted({run for run, _ in pairs})


def _first_box(boxes) -> tuple[float, float, float, float] | None:
    return box_xyxy(boxes[0]) if boxes else None


def _refinement(row: dict[str, Any]) -> Refinement | None:
    """A --refine row's refined_boxes and decoded mask_rle; None for a row without refinement."""
    rle, boxes = row.get("mask_rle"), row.get("refined_boxes")
    if row.get("refine") is None and rle is None and boxes is None:
        return None
    return Refinement([box_xyxy(b) for b in boxes or []], rle_decode(rle) if rle else None)


class _ImageReader:
    """Each row's image, decoded at a reduced size, for the image baselines; None where it is gone."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.counts = {"image_unreadable": 0, "image_size_changed": 0}

    def read(self, source_path: str | None, width: int, height: int) -> np.ndarray | None:
        """RGB pixels of a width x height image; None (counted) if unreadable or now another size."""
        from camjobs.images import ImageInputError, decode_reduced, read_bytes

        if not self.enabled:
            return None
        try:
            if not source_path:
                raise ImageInputError("missing_file", "the row has no source_path")
            rgb, read_width, read_height = decode_reduced(read_bytes(source_path), IMAGE_MIN_SIDE, source=source_path)
        except (ImageInputError, OSError, ValueError):
            self.counts["image_unreadable"] += 1
            return None
        if (read_width, read_height) != (width, height):
            self.counts["image_size_changed"] += 1
            return None
        return rgb


# --------------------------------------------------------------------------- the entry point
def _add_row(evaluator: CamEvaluator, row: dict[str, Any], truth: GroundTruth, images: _ImageReader) -> None:
    """One cams row into the evaluator: its map, boxes[0], refined labels and (read now) pixels."""
    width, height = int(row["width"]), int(row["height"])
    cam = np.asarray(row["cam"], dtype=np.float32).reshape(int(row["cam_height"]), int(row["cam_width"]))
    threshold = row.get("threshold")
    evaluator.add(
        cam,
        width,
        height,
        truth,
        threshold=DEFAULT_THRESHOLD if threshold is None else float(threshold),
        first_box=_first_box(row.get("boxes")),
        label=row.get("label"),
        pred_label=row.get("pred_label"),
        target_label=row.get("target_label"),
        image_id=row["image_id"],
        refined=_refinement(row),
        rgb=images.read(row.get("source_path"), width, height),
    )


def evaluate_output(
    output_dir: str,
    *,
    data: str | None = None,
    masks: str | None = None,
    boxes: str | None = None,
    run_id: str | None = None,
    report_dir: str | None = None,
    max_side: int | None = DEFAULT_MAX_SIDE,
    write: bool = True,
    progress: bool = False,
    image_baselines: bool = True,
) -> EvaluationReport:
    """Evaluate the maps in ``output_dir/cams`` against one source of ground truth.

    data: a dataset with lesion masks (camjobs.layouts; ham10000, isic2017, isic2018); masks: a
    folder of ``<image_id>_segmentation.png`` or ``<image_id>.png``; boxes: a COCO json. Rows:
    ``run_id``'s, or by default the newest run's model and settings over every run (one row per
    image, the newest). Writes the report to ``report_dir`` (default ``output_dir/eval``) unless
    ``write`` is False. ``image_baselines``: read each row's image for the Otsu baseline (False
    for outputs whose images are gone). Raises EvaluationError when there is nothing to evaluate.
    """
    from tqdm import tqdm

    try:
        dataset = open_cams(output_dir)
    except NoResults as exc:
        raise EvaluationError(str(exc)) from exc
    selected, runs = _select_rows(dataset, run_id)
    truth_source = TruthSource(data, masks, boxes)
    evaluator = CamEvaluator(max_side=max_side)
    images = _ImageReader(image_baselines)
    skipped = {"no_ground_truth": 0, "empty_ground_truth": 0}
    done: set[tuple[str, str]] = set()
    bar = tqdm(total=len(selected), desc="evaluate", unit="img", disable=not progress)
    for batch in dataset.to_batches(columns=list(_HEAVY), filter=pc.field("run_id").isin(runs), batch_size=256):
        for row in batch.to_pylist():
            key = (row["run_id"], row["image_id"])
            if key not in selected or key in done:
                continue
            done.add(key)
            bar.update(1)
            width, height = int(row["width"]), int(row["height"])
            truth = truth_source.lookup(row["image_id"], width, height)
            if truth is None:
                skipped["no_ground_truth"] += 1
                continue
            if not truth.boxes:
                skipped["empty_ground_truth"] += 1
                continue
            _add_row(evaluator, row, truth, images)
    bar.close()
    if not evaluator.images:
        raise EvaluationError(
            f"none of the {len(selected)} images has ground truth in {truth_source.description} "
            f"({skipped['no_ground_truth']} without, {skipped['empty_ground_truth']} empty)"
        )
    metrics = evaluator.result()
    metrics["counts"] = {
        "images": len(selected),
        **metrics["counts"],
        **skipped,
        **truth_source.counts,
        **images.counts,
    }
    metrics["settings"].update(
        {
            "output": output_dir,
            "runs": runs,
            "ground_truth": truth_source.description,
            "image_baselines": image_baselines,
        }
    )
    report = EvaluationReport(metrics)
    if write:
        report.report_dir = report_dir or f"{output_dir.rstrip('/')}/eval"
        report.files = write_report(metrics, evaluator.per_image, report.report_dir)
    return report
