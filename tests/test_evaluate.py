"""camjobs.labels.evaluate against known answers and an independent re-implementation of the metrics.

The oracle below is written from the definitions (Choe et al., CVPR 2020; the module docstring),
not from the module: components with cv2.connectedComponentsWithStats instead of findContours,
contour areas by Moore-neighbour tracing and the shoelace formula instead of cv2.contourArea,
hole contours as 4-connected background components, PxAP by counting pixels above each
threshold instead of histograms, IoU and the run's box rule by plain loops. No Ray.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from camjobs.labels.evaluate import CamEvaluator, EvaluationError, GroundTruth, evaluate_output
from camjobs.labels.metrics import pr_curve
from camjobs.labels.truth import index_mask_folder, load_coco_boxes
from camjobs.pipeline.localize import localize
from camjobs.schema import CAMS_SCHEMA

KEYS = (
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
SOURCES = ("centre_baseline", "constant_baseline", "otsu_baseline", "refined")
THRESHOLDS = [k / 100 for k in range(100)]


# --------------------------------------------------------------------------- fixtures: real Parquet
def cams_row(
    image_id,
    cam,
    width,
    height,
    *,
    threshold=0.2,
    label="mel",
    pred_label="mel",
    target_label=None,
    run_id="20260101T000000Z-aaaaaa",
    model="m1",
    boxes=None,
    **columns,
):
    """A cams row as the pipeline writes it; ``columns`` sets others (source_path, mask_rle, refine, ...)."""
    cam = np.asarray(cam, dtype=np.float32)
    if boxes is None:  # the run's own rule, as the pipeline writes it
        boxes = [b.as_dict() for b in localize(cam, height, width, threshold).boxes]
    return {
        "image_id": image_id,
        "source_path": f"/data/{image_id}.jpg",
        "content_sha256": "0" * 64,
        "width": width,
        "height": height,
        "label": label,
        "pred_index": 0,
        "pred_label": pred_label,
        "pred_score": 0.9,
        "target_index": 0,
        "target_label": pred_label if target_label is None else target_label,
        "method": "cam",
        "cam": cam.ravel().tolist(),
        "cam_height": cam.shape[0],
        "cam_width": cam.shape[1],
        "heatmap_png": b"",
        "threshold": threshold,
        "boxes": boxes,
        "model_sha256": model,
        "target_mode": "predicted",
        "input_size": 224,
        "run_id": run_id,
        "schema_version": 2,
        **columns,
    }


def write_output(root: Path, rows: list[dict]) -> Path:
    for run_id in sorted({r["run_id"] for r in rows}):
        folder = root / "cams" / run_id
        folder.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist([r for r in rows if r["run_id"] == run_id], schema=CAMS_SCHEMA)
        pq.write_table(table, folder / "part-00000.parquet")
    return root


def write_masks(folder: Path, masks: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for image_id, mask in masks.items():
        assert cv2.imwrite(str(folder / f"{image_id}_segmentation.png"), mask.astype(np.uint8) * 255)
    return folder


def ellipse_mask(width, height, centre, axes, angle=0.0):
    mask = np.zeros((height, width), np.uint8)
    cv2.ellipse(mask, centre, axes, angle, 0, 360, 1, -1)
    return mask.astype(bool)


# --------------------------------------------------------------------------- the oracle
NEIGHBOURS = [(0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1)]  # clockwise from west


def moore_area(component: np.ndarray) -> float:
    """Area of the polygon through the outer border pixels (Moore-neighbour tracing, shoelace)."""
    ys, xs = np.nonzero(component)
    start = (int(ys[0]), int(xs[0]))  # the top row's leftmost pixel
    height, width = component.shape

    def step(y, x, back):
        for k in range(1, 9):
            d = (back + k) % 8
            ny, nx = y + NEIGHBOURS[d][0], x + NEIGHBOURS[d][1]
            if 0 <= ny < height and 0 <= nx < width and component[ny, nx]:
                by, bx = y + NEIGHBOURS[(d - 1) % 8][0], x + NEIGHBOURS[(d - 1) % 8][1]
                return ny, nx, NEIGHBOURS.index((by - ny, bx - nx))
        return None

    first = step(*start, 0)
    if first is None:
        return 0.0
    path, (y, x, back) = [start], first
    while True:
        following = step(y, x, back)
        if (y, x) == start and following[:2] == first[:2]:
            break
        path.append((y, x))
        y, x, back = following
    pts = np.array(path, dtype=np.float64)
    return abs(np.dot(pts[:, 1], np.roll(pts[:, 0], -1)) - np.dot(pts[:, 0], np.roll(pts[:, 1], -1))) / 2


def oracle_boxes(region: np.ndarray):
    """(largest box, every box): outer borders of 8-connected components, and hole borders."""
    height, width = region.shape
    count, labels, stats, _ = cv2.connectedComponentsWithStats(region.astype(np.uint8), connectivity=8)
    outer = []
    for label in range(1, count):
        x, y, w, h = (int(v) for v in stats[label, :4])
        component = labels == label
        start = np.flatnonzero(component.ravel())[0]  # where a raster scan meets its border first
        outer.append(((moore_area(component), start), (x, y, x + w, y + h)))
    if not outer:
        return None, []
    holes = []
    count, _, stats, _ = cv2.connectedComponentsWithStats((~region).astype(np.uint8), connectivity=4)
    for label in range(1, count):
        x, y, w, h = (int(v) for v in stats[label, :4])
        if x > 0 and y > 0 and x + w < width and y + h < height:  # enclosed: a hole
            holes.append((x - 1, y - 1, x + w + 1, y + h + 1))  # its border runs on the pixels around it
    # Equal areas: findContours lists separate regions last-found first, and max() takes the
    # first of equals (as wsolevaluation does), so the one a raster scan meets last wins.
    largest = max(outer, key=lambda item: item[0])[1]
    return largest, [box for _, box in outer] + holes


def oracle_iou(a, b):
    inter_w = min(a[2], b[2]) - max(a[0], b[0])
    inter_h = min(a[3], b[3]) - max(a[1], b[1])
    inter = inter_w * inter_h if inter_w > 0 and inter_h > 0 else 0.0
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def oracle_run_boxes(upsampled: np.ndarray, threshold: float):
    """The run's rule: {U / max U >= T}, its 8-connected components, largest pixel count first."""
    if upsampled.max() <= 0:
        return np.zeros(upsampled.shape, bool), None
    region = (upsampled / upsampled.max()) >= np.float32(threshold)
    count, _, stats, _ = cv2.connectedComponentsWithStats(region.astype(np.uint8), connectivity=8)
    best = max(range(1, count), key=lambda k: stats[k, cv2.CC_STAT_AREA])
    x, y, w, h = (int(v) for v in stats[best, :4])
    return region, (x, y, x + w, y + h)


def oracle_metrics(images, max_side=None):
    """images: dicts with cam, width, height, mask (or None), boxes (GT), threshold, labels."""
    n = len(images)
    largest_hits = {d: np.zeros(100) for d in (0.3, 0.5, 0.7)}
    any_hits = {d: np.zeros(100) for d in (0.3, 0.5, 0.7)}
    per_image_hits50, tp, fp, positives = [], np.zeros(102), np.zeros(102), 0
    ious, jaccards = [], []
    edges = [2.0, 1.0] + THRESHOLDS[::-1]
    for image in images:
        width, height = image["width"], image["height"]
        grid_w, grid_h = width, height
        if max_side and max(width, height) > max_side:
            scale = max_side / max(width, height)
            grid_w, grid_h = max(1, round(width * scale)), max(1, round(height * scale))
        # Bilinear upsampling, half-pixel centres (test_localize checks it against torch's):
        # PxAP counts pixels against fixed edges, so the oracle upsamples the same way.
        cam = np.array(image["cam"], np.float32)
        grid = cv2.resize(cam, (grid_w, grid_h), interpolation=cv2.INTER_LINEAR)
        grid = grid.astype(np.float64)
        constant = grid.max() - grid.min() <= 1e-6 * np.abs(grid).max()
        score = np.ones_like(grid) if constant else (grid - grid.min()) / (grid.max() - grid.min())
        quantized = np.floor(score * 255).astype(int)
        sx, sy = width / grid_w, height / grid_h
        truth = image["boxes"]
        hits50 = []
        for k, t in enumerate(np.arange(0, 1, 0.01)):
            largest, every = oracle_boxes(quantized > int(t * quantized.max()))
            scaled = [(b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy) for b in every]
            best_any = max((oracle_iou(b, g) for b in scaled for g in truth), default=0.0)
            best_largest = 0.0
            if largest is not None:
                lb = (largest[0] * sx, largest[1] * sy, largest[2] * sx, largest[3] * sy)
                best_largest = max(oracle_iou(lb, g) for g in truth)
            for d in largest_hits:
                largest_hits[d][k] += best_largest >= d
                any_hits[d][k] += best_any >= d
            hits50.append(best_largest >= 0.5)
        per_image_hits50.append(hits50)
        # PxAP: count the pixels at or above each edge
        if image["mask"] is not None:
            mask = image["mask"]
            if (grid_w, grid_h) != (width, height):
                mask = cv2.resize(mask.astype(np.uint8) * 255, (grid_w, grid_h), interpolation=cv2.INTER_AREA) > 127
            for k, e in enumerate(edges):
                tp[k] += np.count_nonzero((score >= e) & mask)
                fp[k] += np.count_nonzero((score >= e) & ~mask)
            positives += np.count_nonzero(mask)
        # the run's threshold, at full size
        full = cv2.resize(cam, (width, height), interpolation=cv2.INTER_LINEAR)
        region, first = oracle_run_boxes(full, image["threshold"])
        ious.append(max(oracle_iou(first, g) for g in truth) if first else 0.0)
        if image["mask"] is not None:
            inter, union = np.count_nonzero(region & image["mask"]), np.count_nonzero(region | image["mask"])
            jaccards.append(inter / union)
    curve = {d: 100 * largest_hits[d] / n for d in largest_hits}
    best = int(np.argmax(curve[0.5]))
    hits = np.array(per_image_hits50)[:, best]
    labelled = [im["label"] is not None for im in images]
    correct = [im["label"] is not None and im["pred_label"] == im["label"] for im in images]
    known = [im["label"] is not None and im["target_label"] == im["label"] for im in images]
    pxap = None
    if positives:
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        recall = tp / positives
        pxap = 100 * sum(precision[k] * (recall[k] - recall[k - 1]) for k in range(1, len(edges)))
    return {
        "max_box_acc": curve[0.5][best],
        "max_box_acc_v2": np.mean([(100 * any_hits[d] / n).max() for d in any_hits]),
        "pxap": pxap,
        "top1_loc": 100 * sum(h and c for h, c in zip(hits, correct)) / sum(labelled) if any(labelled) else None,
        "gt_known_loc": 100 * sum(h and k for h, k in zip(hits, known)) / sum(known) if any(known) else None,
        "mean_iou": 100 * float(np.mean(ious)),
        "iou50_share": 100 * float(np.mean([iou >= 0.5 for iou in ious])),
        "jaccard_mean": 100 * float(np.mean(jaccards)) if jaccards else None,
        "jaccard_isic2018": 100 * float(np.mean([j if j >= 0.65 else 0.0 for j in jaccards])) if jaccards else None,
        "best_threshold": round(float(np.arange(0, 1, 0.01)[best]), 2),
        "largest_curve_50": curve[0.5],
        "any_curves": {d: 100 * any_hits[d] / n for d in any_hits},
    }


def assert_matches_oracle(metrics, expected):
    for key in KEYS:
        if expected[key] is None:
            assert metrics[key] is None, key
        else:
            assert metrics[key] == pytest.approx(expected[key], abs=1e-6), key
    assert metrics["details"]["best_threshold"] == pytest.approx(expected["best_threshold"])
    curves = metrics["details"]["box_acc_curves"]
    np.testing.assert_allclose(curves["largest_contour"]["0.5"], expected["largest_curve_50"], atol=1e-9)
    for d in (0.3, 0.5, 0.7):
        np.testing.assert_allclose(curves["all_contours"][str(d)], expected["any_curves"][d], atol=1e-9)


def smooth_random(rng, height, width, cells=(4, 7)):
    small = rng.normal(size=(int(rng.integers(*cells)), int(rng.integers(*cells)))).astype(np.float32)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


def random_images(seed, count, sizes=(24, 56)):
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        width, height = (int(v) for v in rng.integers(*sizes, size=2))
        mask = smooth_random(rng, height, width) > rng.uniform(0.0, 0.8)
        if not mask.any():
            mask[height // 3 : height // 2, width // 3 : width // 2] = True
        cam = rng.normal(size=(int(rng.integers(3, 8)), int(rng.integers(3, 8)))).astype(np.float32)
        if i % 3 == 0:  # a raw map at the image's size (no upsampling)
            cam = smooth_random(rng, height, width) + 0.3 * rng.normal(size=(height, width)).astype(np.float32)
        label = [None, "mel", "nv"][i % 3]
        pred = ["mel", "nv"][int(rng.integers(2))]
        images.append(
            {
                "image_id": f"img{i:02d}",
                "cam": cam,
                "width": width,
                "height": height,
                "mask": mask,
                "threshold": float(np.float32([0.2, 0.35, 0.5][i % 3])),
                "label": label,
                "pred_label": pred,
                "target_label": pred if i % 2 else (label or pred),
            }
        )
    return images


def write_images(tmp_path: Path, images) -> tuple[Path, Path]:
    rows = [
        cams_row(
            im["image_id"],
            im["cam"],
            im["width"],
            im["height"],
            threshold=im["threshold"],
            label=im["label"],
            pred_label=im["pred_label"],
            target_label=im["target_label"],
        )
        for im in images
    ]
    for im in images:
        from camjobs.geometry import mask_box

        im["boxes"] = [mask_box(im["mask"])]
    return write_output(tmp_path / "out", rows), write_masks(
        tmp_path / "masks", {im["image_id"]: im["mask"] for im in images}
    )


# --------------------------------------------------------------------------- known answers
def test_a_map_that_is_the_mask_scores_100(tmp_path):
    sizes = [(64, 48, (30, 22), (18, 12)), (50, 70, (25, 40), (15, 20)), (80, 60, (50, 25), (20, 15))]
    masks = {f"m{i}": ellipse_mask(w, h, c, a, 20 * i) for i, (w, h, c, a) in enumerate(sizes)}
    rows = [cams_row(k, m.astype(np.float32), m.shape[1], m.shape[0]) for k, m in masks.items()]
    out = write_output(tmp_path / "out", rows)
    report = evaluate_output(str(out), masks=str(write_masks(tmp_path / "masks", masks)), write=False)
    for key in KEYS:
        assert report[key] == pytest.approx(100.0), key
    assert report["details"]["box_acc_v2_by_iou"] == {"0.3": 100.0, "0.5": 100.0, "0.7": 100.0}
    assert report["counts"]["evaluated"] == 3
    # the baselines are worse
    assert report["centre_baseline"]["pxap"] < 100 and report["constant_baseline"]["max_box_acc"] == 0.0


def test_a_constant_map_scores_as_the_whole_image_box(tmp_path):
    # GT boxes covering 90%x80% (IoU .72), 60%x90% (.54), 50%x50% (.25), 70%x60% (.42) of the image
    fractions = [(0.9, 0.8), (0.6, 0.9), (0.5, 0.5), (0.7, 0.6)]
    masks, rows = {}, []
    for i, (fx, fy) in enumerate(fractions):
        width, height = 60 + 10 * i, 50
        mask = np.zeros((height, width), bool)
        x0, y0 = int(width * (1 - fx) / 2), int(height * (1 - fy) / 2)
        mask[y0 : y0 + round(height * fy), x0 : x0 + round(width * fx)] = True
        masks[f"c{i}"] = mask
        rows.append(cams_row(f"c{i}", np.full((7, 7), 0.3), width, height))
    out = write_output(tmp_path / "out", rows)
    report = evaluate_output(str(out), masks=str(write_masks(tmp_path / "masks", masks)), write=False)
    whole = [oracle_iou((0, 0, m.shape[1], m.shape[0]), (0, 0, m.sum(1).max(), m.sum(0).max())) for m in masks.values()]
    assert report["max_box_acc"] == pytest.approx(100 * np.mean([w >= 0.5 for w in whole]))  # 50
    assert report["max_box_acc"] == pytest.approx(50.0)
    assert report["max_box_acc_v2"] == pytest.approx(
        100 * np.mean([np.mean([w >= d for w in whole]) for d in (0.3, 0.5, 0.7)])
    )
    positives = sum(m.sum() for m in masks.values()) / sum(m.size for m in masks.values())
    assert report["pxap"] == pytest.approx(100 * positives)
    assert report["mean_iou"] == pytest.approx(100 * np.mean(whole))
    for key in KEYS:  # a constant map is the constant baseline, metric for metric
        assert report[key] == pytest.approx(report["constant_baseline"][key]), key


def test_two_blobs_only_the_largest_counts_for_max_box_acc(tmp_path):
    width, height = 80, 60
    big = ellipse_mask(width, height, (25, 30), (18, 22))
    small = ellipse_mask(width, height, (65, 15), (6, 5))
    cam = (big | small).astype(np.float32)
    images = [
        {"image_id": "on_big", "mask": big},  # the largest contour is the lesion: a hit
        {"image_id": "on_small", "mask": small},  # the lesion is the small blob: only all-contour boxes hit it
    ]
    rows = [cams_row(im["image_id"], cam, width, height) for im in images]
    out = write_output(tmp_path / "out", rows)
    report = evaluate_output(
        str(out), masks=str(write_masks(tmp_path / "masks", {i["image_id"]: i["mask"] for i in images})), write=False
    )
    assert report["max_box_acc"] == pytest.approx(50.0)
    assert report["max_box_acc_v2"] == pytest.approx(100.0)
    assert report["gt_known_loc"] == pytest.approx(50.0) and report["top1_loc"] == pytest.approx(50.0)
    assert report["mean_iou"] == pytest.approx(50.0)  # boxes[0] is the big blob: IoU 1, then 0
    for im in images:
        im.update(cam=cam, width=width, height=height, threshold=0.2, label="mel", pred_label="mel", target_label="mel")
        im["boxes"] = [
            (
                np.nonzero(im["mask"].any(0))[0][0],
                np.nonzero(im["mask"].any(1))[0][0],
                np.nonzero(im["mask"].any(0))[0][-1] + 1,
                np.nonzero(im["mask"].any(1))[0][-1] + 1,
            )
        ]
    assert_matches_oracle(report.metrics, oracle_metrics(images))


def test_hole_contours_count_for_all_contour_boxes():
    # a ring whose hole is the lesion: the hole's border is a contour (RETR_TREE, as wsolevaluation)
    width, height = 60, 60
    cam = np.zeros((height, width), np.float32)
    cam[5:55, 5:55] = 1.0
    cam[20:40, 20:40] = 0.0
    lesion = np.zeros((height, width), bool)
    lesion[20:40, 20:40] = True
    evaluator = CamEvaluator()
    evaluator.add(cam, width, height, GroundTruth([(20, 20, 40, 40)], lesion))
    metrics = evaluator.result()
    assert metrics["max_box_acc"] == 0.0  # the outer border's box, (5, 5, 55, 55): IoU 0.16
    # the hole's border runs on the ring pixels around it: (19, 19, 41, 41), IoU 400/484
    assert metrics["details"]["box_acc_v2_by_iou"] == {"0.3": 100.0, "0.5": 100.0, "0.7": 100.0}


# --------------------------------------------------------------------------- against the oracle
@pytest.mark.parametrize("seed", [0, 1])
def test_random_maps_match_the_independent_implementation(tmp_path, seed):
    images = random_images(seed, 7)
    out, masks = write_images(tmp_path, images)
    # thresholds differ per row here (a run has one), so name the run: all of its rows count
    report = evaluate_output(str(out), masks=str(masks), run_id="20260101T000000Z-aaaaaa", write=False)
    assert report["counts"]["evaluated"] == 7
    assert_matches_oracle(report.metrics, oracle_metrics(images))


def test_large_images_are_swept_on_a_downscaled_grid(tmp_path):
    images = random_images(5, 5, sizes=(40, 70))
    out, masks = write_images(tmp_path, images)
    report = evaluate_output(str(out), masks=str(masks), run_id="20260101T000000Z-aaaaaa", max_side=32, write=False)
    assert report["counts"]["downscaled"] == 5
    assert_matches_oracle(report.metrics, oracle_metrics(images, max_side=32))


def test_pr_curve_matches_pixel_counting():
    rng = np.random.default_rng(7)
    score, mask = rng.random((30, 40)), rng.random((30, 40)) < 0.3
    score[0, 0], score[1, 1] = 0.0, 1.0
    from camjobs.labels.metrics import pixel_histograms

    curve = pr_curve(*pixel_histograms(score, mask))
    expected = oracle_metrics(
        [
            {
                "cam": score.astype(np.float32),
                "width": 40,
                "height": 30,
                "mask": mask,
                "boxes": [(0, 0, 40, 30)],
                "threshold": 0.2,
                "label": None,
                "pred_label": None,
                "target_label": None,
            }
        ]
    )["pxap"]
    assert curve.pxap == pytest.approx(expected, abs=1e-9)
    assert np.all(np.diff(curve.recall) >= 0) and curve.recall[-1] == 1.0
    assert curve.precision[-1] == pytest.approx(mask.mean())


# --------------------------------------------------------------------------- sources of ground truth
def test_coco_boxes_on_a_real_output_fixture(tmp_path):
    out = tmp_path / "out"
    shutil.copytree(Path(__file__).parent / "fixtures" / "output-v1", out)
    coco = {
        "images": [
            {"id": 1, "file_name": "img0.jpg", "width": 64, "height": 48},
            {"id": 2, "file_name": "sub/img1.png", "width": 128, "height": 96},
        ],  # twice the size: rescaled
        "annotations": [
            {"id": 1, "image_id": 1, "bbox": [10, 8, 40, 30], "category_id": 1},
            {"id": 2, "image_id": 2, "bbox": [0, 0, 128, 96], "category_id": 1},
            {"id": 3, "image_id": 2, "bbox": [20, 20, 30, 30], "category_id": 1},
        ],
    }
    (tmp_path / "boxes.json").write_text(json.dumps(coco))
    report = evaluate_output(str(out), boxes=str(tmp_path / "boxes.json"), report_dir=str(tmp_path / "report"))
    assert report["pxap"] is None and report["jaccard_isic2018"] is None
    assert report["counts"]["evaluated"] == 2 and report["counts"]["no_ground_truth"] == 1  # img2 has no entry
    assert report["counts"]["boxes_rescaled"] == 1
    import pandas as pd

    rows = pd.read_parquet(out / "cams").set_index("image_id")
    images = []
    for image_id, boxes in (("img0", [(10, 8, 50, 38)]), ("img1", [(0, 0, 64, 48), (10, 10, 25, 25)])):
        row = rows.loc[image_id]
        images.append(
            {
                "cam": np.asarray(row.cam, np.float32).reshape(row.cam_height, row.cam_width),
                "width": 64,
                "height": 48,
                "mask": None,
                "boxes": boxes,
                "threshold": float(row.threshold),
                **{k: row[k] if isinstance(row[k], str) else None for k in ("label", "pred_label", "target_label")},
            }
        )
    assert_matches_oracle(report.metrics, oracle_metrics(images))
    for name in ("metrics.json", "metrics.md", "per_image.csv", "pr_curve.png", "box_acc.png"):
        assert (tmp_path / "report" / name).is_file()


def test_mask_folder_and_coco_keys(tmp_path):
    folder = tmp_path / "masks"
    (folder / "sub").mkdir(parents=True)
    for name in ("ISIC_1_segmentation.png", "ISIC_1.png", "sub/x.png", "ISIC_2.png", "notes.txt"):
        cv2.imwrite(str(folder / name), np.zeros((4, 4), np.uint8)) if name.endswith(".png") else (
            folder / name
        ).write_text("")
    index = index_mask_folder(str(folder))
    assert index["ISIC_1"].endswith("ISIC_1_segmentation.png")  # the _segmentation file wins
    assert index["ISIC_2"].endswith("ISIC_2.png") and index["sub/x"] == index["x"]
    assert not any(k.startswith("notes") for k in index)
    (tmp_path / "c.json").write_text(
        json.dumps(
            {
                "images": [
                    {"id": 7, "file_name": "a/p.jpg"},
                    {"id": 8, "file_name": "b/p.jpg"},
                    {"id": 9, "file_name": "q.jpg"},
                ],
                "annotations": [{"image_id": 9, "bbox": [1, 2, 3, 4]}],
            }
        )
    )
    coco = load_coco_boxes(str(tmp_path / "c.json"))
    assert "p" not in coco and {"a/p", "b/p", "q", "7", "9"} <= set(coco)  # an ambiguous base name is left out
    assert coco["q"].boxes == [(1.0, 2.0, 4.0, 6.0)] and coco["9"] is coco["q"]


def test_rows_default_to_the_newest_runs_settings(tmp_path):
    mask = ellipse_mask(40, 30, (20, 15), (10, 8))
    good, bad = mask.astype(np.float32), (~mask).astype(np.float32)
    rows = [
        cams_row("a", bad, 40, 30, run_id="20260101T000000Z-old", model="m0"),  # another model: left out
        cams_row("a", bad, 40, 30, run_id="20260102T000000Z-aaa", model="m1"),  # replaced by the newer row
        cams_row("b", good, 40, 30, run_id="20260102T000000Z-aaa", model="m1"),
        cams_row("a", good, 40, 30, run_id="20260103T000000Z-bbb", model="m1"),  # incremental: new content
    ]
    out = write_output(tmp_path / "out", rows)
    masks = write_masks(tmp_path / "masks", {"a": mask, "b": mask})
    report = evaluate_output(str(out), masks=str(masks), write=False)
    assert report["counts"]["images"] == 2 and report["max_box_acc"] == 100.0
    assert report["settings"]["runs"] == ["20260102T000000Z-aaa", "20260103T000000Z-bbb"]
    only = evaluate_output(str(out), masks=str(masks), run_id="20260101T000000Z-old", write=False)
    assert only["counts"]["images"] == 1 and only["max_box_acc"] == 0.0
    with pytest.raises(EvaluationError, match="no rows of run"):
        evaluate_output(str(out), masks=str(masks), run_id="nope", write=False)


def test_usage_errors(tmp_path):
    mask = ellipse_mask(40, 30, (20, 15), (10, 8))
    out = write_output(tmp_path / "out", [cams_row("a", mask.astype(np.float32), 40, 30)])
    masks = write_masks(tmp_path / "masks", {"other": mask})
    with pytest.raises(EvaluationError, match="exactly one"):
        evaluate_output(str(out), write=False)
    with pytest.raises(EvaluationError, match="exactly one"):
        evaluate_output(str(out), masks=str(masks), boxes="x.json", write=False)
    with pytest.raises(EvaluationError, match="none of the 1 images has ground truth"):
        evaluate_output(str(out), masks=str(masks), write=False)
    with pytest.raises(EvaluationError, match="no cams/"):
        evaluate_output(str(tmp_path / "empty"), masks=str(masks), write=False)


# --------------------------------------------------------------------------- real data
def mask_cam_rows(dataset: Path, names: list[str] | None = None) -> list[dict]:
    """Rows for real ISIC images whose map is the blurred mask at 7x7, as a CAM would be; real source_paths."""
    rows = []
    for path in sorted((dataset / "ISIC-2017_Training_Part1_GroundTruth").glob("*.png")):
        image_id = path.name.replace("_segmentation.png", "")
        if names is not None and image_id not in names:
            continue
        mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255
        cam = cv2.resize(cv2.GaussianBlur(mask, (0, 0), 25), (7, 7), interpolation=cv2.INTER_AREA)
        source = dataset / "ISIC-2017_Training_Data" / f"{image_id}.jpg"
        rows.append(
            cams_row(
                image_id, cam, mask.shape[1], mask.shape[0], label="nevus", pred_label="nevus", source_path=str(source)
            )
        )
    return rows


def test_isic2017_mini_report(tmp_path, isic2017_mini):
    """Six real ISIC 2017 images, their maps made from the masks; the Otsu baseline reads the JPEGs."""
    out = write_output(tmp_path / "out", mask_cam_rows(isic2017_mini))
    report = evaluate_output(str(out), data=str(isic2017_mini))
    report_dir = out / "eval"
    assert report.report_dir == str(report_dir)
    for name in ("metrics.json", "metrics.md", "per_image.csv", "pr_curve.png", "box_acc.png"):
        assert (report_dir / name).is_file(), name
    metrics = json.loads((report_dir / "metrics.json").read_text())
    for block in (metrics, metrics["centre_baseline"], metrics["constant_baseline"], metrics["otsu_baseline"]):
        for key in KEYS:
            assert 0.0 <= block[key] <= 100.0, key
    assert all(value is None for value in metrics["refined"].values())  # no --refine
    counts = metrics["counts"]
    assert counts["evaluated"] == 6 and counts["with_mask"] == 6 and counts["otsu_images"] == 6
    assert counts["refined_images"] == 0 and counts["image_unreadable"] == 0
    # maps made from the masks localize the lesions better than either fixed baseline
    assert metrics["max_box_acc"] >= 80 and metrics["pxap"] > metrics["centre_baseline"]["pxap"] > 0
    assert metrics["pxap"] > metrics["constant_baseline"]["pxap"]
    # on these clean dermoscopy images the image alone finds the lesion better than the centre box
    assert metrics["otsu_baseline"]["mean_iou"] > metrics["centre_baseline"]["mean_iou"]
    for name in ("pr_curve.png", "box_acc.png"):
        image = cv2.imread(str(report_dir / name))
        assert image is not None and image.shape[2] == 3 and image.shape[0] > 400
    assert (
        "| metric | CAM | refined (--refine) | Otsu lesion mask | centre box | constant map |"
        in (report_dir / "metrics.md").read_text()
    )
    per_image = read_per_image(report_dir)
    for image_id, row in per_image.items():
        rgb = pil_rgb(isic2017_mini / "ISIC-2017_Training_Data" / f"{image_id}.jpg")
        truth = read_truth_mask(isic2017_mini / "ISIC-2017_Training_Part1_GroundTruth" / f"{image_id}_segmentation.png")
        expected_iou, expected_jaccard = otsu_oracle(rgb, truth)
        assert float(row["otsu_box_iou"]) == pytest.approx(expected_iou, abs=1e-12), image_id
        assert float(row["otsu_jaccard"]) == pytest.approx(expected_jaccard, abs=1e-12), image_id
        assert row["refined_box_iou"] == "" and row["refined_jaccard"] == ""
    # the same masks through a mask folder give the same numbers
    same = evaluate_output(str(out), masks=str(isic2017_mini / "ISIC-2017_Training_Part1_GroundTruth"), write=False)
    for key in KEYS:
        assert same[key] == pytest.approx(metrics[key]), key
        assert same["otsu_baseline"][key] == pytest.approx(metrics["otsu_baseline"][key]), key


def test_isic2017_sample_otsu_baseline(tmp_path, isic2017_sample):
    """A dozen images of the shared ISIC 2017 sample (skipped where it is absent)."""
    names = sorted(p.stem for p in (isic2017_sample / "ISIC-2017_Training_Data").glob("*.jpg"))[::12]
    out = write_output(tmp_path / "out", mask_cam_rows(isic2017_sample, names))
    report = evaluate_output(str(out), data=str(isic2017_sample), report_dir=str(tmp_path / "report"))
    assert report["counts"]["evaluated"] == len(names) == report["counts"]["otsu_images"]
    ious, jaccards = [], []
    for image_id, row in read_per_image(tmp_path / "report").items():
        rgb = pil_rgb(isic2017_sample / "ISIC-2017_Training_Data" / f"{image_id}.jpg")
        truth = read_truth_mask(
            isic2017_sample / "ISIC-2017_Training_Part1_GroundTruth" / f"{image_id}_segmentation.png"
        )
        iou, jaccard = otsu_oracle(rgb, truth)
        assert float(row["otsu_box_iou"]) == pytest.approx(iou, abs=1e-12), image_id
        ious.append(iou)
        jaccards.append(jaccard)
    otsu = report["otsu_baseline"]
    assert otsu["mean_iou"] == pytest.approx(100 * np.mean(ious))
    assert otsu["iou50_share"] == pytest.approx(100 * np.mean(np.array(ious) >= 0.5))
    assert otsu["jaccard_mean"] == pytest.approx(100 * np.mean(jaccards))


# --------------------------------------------------------------------------- the Otsu baseline
def pil_rgb(path: Path) -> np.ndarray:
    """The file's pixels by Pillow directly (not camjobs.images), full size."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def read_truth_mask(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) > 127


def np_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum()) / float(np.logical_or(a, b).sum())


def np_box(mask: np.ndarray):
    """The tightest box (max exclusive) of a mask, by numpy alone; None when empty."""
    ys, xs = np.nonzero(mask)
    return (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) if xs.size else None


def otsu_oracle(rgb: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(box IoU, Jaccard) of the Otsu lesion mask of an image with the ground-truth mask."""
    from camjobs.segment import otsu_lesion_mask

    mask = otsu_lesion_mask(rgb, truth.shape[1], truth.shape[0])
    if mask is None:
        return 0.0, 0.0
    box = np_box(mask)
    return (oracle_iou(box, np_box(truth)) if box else 0.0), np_jaccard(mask, truth)


def read_per_image(report_dir: Path) -> dict[str, dict[str, str]]:
    import csv

    with open(report_dir / "per_image.csv", newline="") as stream:
        return {row["image_id"]: row for row in csv.DictReader(stream)}


def lesion_photo(width, height, centre, axes, seed, angle=0.0) -> np.ndarray:
    """A dermoscopy-like RGB image: noisy skin with a dark, blurred, noisy elliptical lesion."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.float32)
    image[:] = (205, 160, 140)
    lesion = ellipse_mask(width, height, centre, axes, angle)
    image[lesion] = (110, 70, 50)
    image = cv2.GaussianBlur(image, (0, 0), 1.5) + rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_jpeg(path: Path, rgb: np.ndarray) -> str:
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
    return str(path)


def otsu_fixture(tmp_path: Path):
    """Real JPEG files and masks: lesions the mask matches or misses, a flat image, a deleted file,
    a file replaced by another size. Returns (rows, masks, images: image_id -> RGB as read back or None)."""
    folder = tmp_path / "images"
    folder.mkdir()
    specs = [  # image_id, size, lesion drawn, ground-truth ellipse (None: the drawn one), labels
        ("good", (120, 90), ((60, 45), (30, 20)), None, ("mel", "mel", "mel")),
        ("shifted", (100, 140), ((50, 70), (25, 35)), ((58, 80), (25, 35)), ("mel", "nv", "mel")),
        ("offside", (160, 120), ((40, 40), (22, 18)), ((110, 80), (30, 25)), ("nv", "nv", "nv")),
        ("small_truth", (140, 100), ((70, 50), (45, 32)), ((70, 50), (15, 10)), (None, "nv", "nv")),
        ("flat", (80, 60), None, ((40, 30), (15, 10)), ("mel", "mel", "mel")),
        ("deleted", (90, 70), ((45, 35), (20, 15)), None, ("mel", "mel", "mel")),
        ("replaced", (90, 70), ((45, 35), (20, 15)), None, ("nv", "nv", "nv")),
    ]
    rows, masks, images = [], {}, {}
    for k, (image_id, (width, height), lesion, truth, (label, pred, target)) in enumerate(specs):
        rgb = (
            np.full((height, width, 3), 150, np.uint8)
            if lesion is None
            else lesion_photo(width, height, *lesion, seed=k)
        )
        path = write_jpeg(folder / f"{image_id}.jpg", rgb)
        masks[image_id] = ellipse_mask(width, height, *(truth or lesion))
        cam = cv2.GaussianBlur(masks[image_id].astype(np.float32), (0, 0), 6)[::8, ::8]
        rows.append(
            cams_row(image_id, cam, width, height, label=label, pred_label=pred, target_label=target, source_path=path)
        )
        images[image_id] = pil_rgb(Path(path))
    (folder / "deleted.jpg").unlink()
    write_jpeg(folder / "replaced.jpg", lesion_photo(50, 40, (25, 20), (10, 8), seed=99))
    images["deleted"] = images["replaced"] = None
    return rows, masks, images


def binary_pxap(pairs) -> float:
    """PxAP of binary maps, pixels pooled: two points on the curve, at the map and at every pixel."""
    hits = sum(np.count_nonzero(region & truth) for region, truth in pairs)
    covered = sum(np.count_nonzero(region) for region, _ in pairs)
    positives = sum(np.count_nonzero(truth) for _, truth in pairs)
    pixels = sum(truth.size for _, truth in pairs)
    recall = hits / positives
    precision = hits / covered if covered else 0.0
    return 100 * (precision * recall + positives / pixels * (1 - recall))


def expected_binary(entries) -> dict:
    """Every metric of a source with nothing to sweep, from (IoUs of its boxes, region, truth mask, labels)."""
    first = np.array([ious[0] if ious else 0.0 for ious, *_ in entries])
    best = np.array([max(ious) if ious else 0.0 for ious, *_ in entries])
    jaccards = np.array([np_jaccard(region, truth) for _, region, truth, _ in entries])
    labels = [labels for *_, labels in entries]
    labelled = [label is not None for label, _, _ in labels]
    correct = [label is not None and pred == label for label, pred, _ in labels]
    known = [label is not None and target == label for label, _, target in labels]
    hits = first >= 0.5
    return {
        "max_box_acc": 100 * hits.mean(),
        "max_box_acc_v2": 100 * np.mean([(best >= d).mean() for d in (0.3, 0.5, 0.7)]),
        "pxap": binary_pxap([(region, truth) for _, region, truth, _ in entries]),
        "top1_loc": 100 * np.sum(hits & correct) / sum(labelled),
        "gt_known_loc": 100 * np.sum(hits & known) / sum(known),
        "mean_iou": 100 * first.mean(),
        "iou50_share": 100 * hits.mean(),
        "jaccard_mean": 100 * jaccards.mean(),
        "jaccard_isic2018": 100 * np.where(jaccards >= 0.65, jaccards, 0.0).mean(),
    }


def assert_block(block: dict, expected: dict) -> None:
    for key in KEYS:
        assert block[key] == pytest.approx(expected[key], abs=1e-9), key


def test_otsu_baseline_against_an_oracle_on_real_jpegs(tmp_path):
    from camjobs.segment import otsu_lesion_mask

    rows, masks, images = otsu_fixture(tmp_path)
    out = write_output(tmp_path / "out", rows)
    report = evaluate_output(
        str(out), masks=str(write_masks(tmp_path / "masks", masks)), report_dir=str(tmp_path / "report")
    )
    counts = report["counts"]
    assert counts["evaluated"] == 7  # the CAM and the fixed baselines count every image
    assert counts["image_unreadable"] == 1 and counts["image_size_changed"] == 1 and counts["otsu_images"] == 5
    per_image = read_per_image(tmp_path / "report")
    entries = []
    for row in rows:
        image_id, truth, rgb = row["image_id"], masks[row["image_id"]], images[row["image_id"]]
        if rgb is None:  # left out of the Otsu baseline, not scored as a miss
            assert per_image[image_id]["otsu_box_iou"] == per_image[image_id]["otsu_jaccard"] == ""
            continue
        otsu = otsu_lesion_mask(rgb, row["width"], row["height"])
        if otsu is None:
            assert image_id == "flat"
            otsu = np.zeros_like(truth)
        box = np_box(otsu)
        iou = oracle_iou(box, np_box(truth)) if box else 0.0
        assert float(per_image[image_id]["otsu_box_iou"]) == pytest.approx(iou, abs=1e-12), image_id
        assert float(per_image[image_id]["otsu_jaccard"]) == pytest.approx(np_jaccard(otsu, truth), abs=1e-12)
        entries.append(([iou] if box else [], otsu, truth, (row["label"], row["pred_label"], row["target_label"])))
    # the fixture spans hits and misses
    assert {float(per_image[i]["otsu_box_iou"]) >= 0.5 for i in ("good", "offside")} == {True, False}
    assert_block(report["otsu_baseline"], expected_binary(entries))


def test_a_large_jpeg_is_read_at_a_reduced_size_with_the_full_sizes_answer(tmp_path):
    width, height = 1400, 1050  # JPEG draft mode decodes it at half size
    rgb = lesion_photo(width, height, (600, 560), (300, 220), seed=3, angle=15)
    path = write_jpeg(tmp_path / "big.jpg", rgb)
    truth = ellipse_mask(width, height, (620, 540), (300, 220), 15)
    cam = cv2.resize(truth.astype(np.float32), (7, 7), interpolation=cv2.INTER_AREA)
    out = write_output(tmp_path / "out", [cams_row("big", cam, width, height, source_path=path)])
    evaluate_output(
        str(out), masks=str(write_masks(tmp_path / "masks", {"big": truth})), report_dir=str(tmp_path / "r")
    )
    row = read_per_image(tmp_path / "r")["big"]
    iou, jaccard = otsu_oracle(pil_rgb(Path(path)), truth)
    assert iou > 0.8
    assert float(row["otsu_box_iou"]) == pytest.approx(iou, abs=0.01)
    assert float(row["otsu_jaccard"]) == pytest.approx(jaccard, abs=0.01)


def test_image_baselines_off(tmp_path):
    rows, masks, _ = otsu_fixture(tmp_path)
    out = write_output(tmp_path / "out", rows)
    masks_dir = write_masks(tmp_path / "masks", masks)
    report = evaluate_output(str(out), masks=str(masks_dir), write=False, image_baselines=False)
    assert all(value is None for value in report["otsu_baseline"].values())
    assert report["counts"]["otsu_images"] == 0 and report["counts"]["image_unreadable"] == 0
    assert report["settings"]["image_baselines"] is False
    on = evaluate_output(str(out), masks=str(masks_dir), write=False)
    for key in KEYS:  # the other sources do not depend on it
        assert report[key] == on[key], key
        assert report["centre_baseline"][key] == on["centre_baseline"][key], key


def test_cli_no_image_baselines(tmp_path):
    from typer.testing import CliRunner

    from camjobs.cli import app

    rows, masks, _ = otsu_fixture(tmp_path)
    out = write_output(tmp_path / "out", rows)
    masks_dir = write_masks(tmp_path / "masks", masks)
    result = CliRunner().invoke(
        app, ["evaluate", "--output", str(out), "--masks", str(masks_dir), "--no-image-baselines"]
    )
    assert result.exit_code == 0, result.output
    assert "| metric | CAM | refined (--refine) | Otsu lesion mask | centre box | constant map |" in result.output
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["otsu_baseline"]["mean_iou"] is None and metrics["settings"]["image_baselines"] is False


# --------------------------------------------------------------------------- refined labels (--refine)
def coco_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE by pycocotools directly, counts as text (the mask_rle column)."""
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def box_struct(box, score=1.0) -> dict:
    return dict(zip(("x_min", "y_min", "x_max", "y_max"), map(float, box)), score=score)


def refined_fixture():
    """(rows, truth masks, refined masks or None, refined boxes): refined rows of one --refine run."""
    width, height = 80, 60
    big = ellipse_mask(width, height, (28, 30), (18, 20))
    small = ellipse_mask(width, height, (66, 14), (7, 6))
    specs = [  # image_id, truth, refined mask (None: null mask_rle), labels
        ("both_on_big", big, big | small, ("mel", "mel", "mel")),
        ("both_on_small", small, big | small, ("mel", "mel", "mel")),  # only an all-boxes metric finds it
        ("shrunk", big, ellipse_mask(width, height, (28, 30), (11, 13)), ("nv", "mel", "nv")),
        ("flat_map", big, None, (None, "nv", "nv")),  # the map was empty or flat: no mask, no boxes
    ]
    rows, truths, refined, boxes = [], {}, {}, {}
    for image_id, truth, mask, (label, pred, target) in specs:
        found = (
            []
            if mask is None
            else [np_box(mask & big), np_box(mask & small)]
            if (mask & small).any()
            else [np_box(mask)]
        )
        rows.append(
            cams_row(
                image_id,
                truth.astype(np.float32),
                width,
                height,
                label=label,
                pred_label=pred,
                target_label=target,
                refine="cam-blue-otsu-1",
                mask_rle=None if mask is None else coco_rle(mask),
                refined_boxes=None if mask is None else [box_struct(b) for b in found],
            )
        )
        truths[image_id], refined[image_id], boxes[image_id] = truth, mask, found
    return rows, truths, refined, boxes


def test_refined_labels_against_an_oracle(tmp_path):
    rows, truths, refined, boxes = refined_fixture()
    out = write_output(tmp_path / "out", rows)
    report = evaluate_output(
        str(out), masks=str(write_masks(tmp_path / "masks", truths)), report_dir=str(tmp_path / "report")
    )
    assert report["counts"]["refined_images"] == 4 and report["counts"]["refined_mask_resized"] == 0
    per_image = read_per_image(tmp_path / "report")
    entries = []
    for row in rows:
        image_id, truth = row["image_id"], truths[row["image_id"]]
        mask = refined[image_id] if refined[image_id] is not None else np.zeros_like(truth)
        ious = [oracle_iou(b, np_box(truth)) for b in boxes[image_id]]
        assert float(per_image[image_id]["refined_box_iou"]) == pytest.approx(ious[0] if ious else 0.0, abs=1e-12)
        assert float(per_image[image_id]["refined_jaccard"]) == pytest.approx(np_jaccard(mask, truth), abs=1e-12)
        entries.append((ious, mask, truth, (row["label"], row["pred_label"], row["target_label"])))
    expected = expected_binary(entries)
    assert_block(report["refined"], expected)
    assert expected["max_box_acc_v2"] > expected["max_box_acc"]  # both_on_small: its second box
    assert report["refined"]["mean_iou"] != report["mean_iou"]  # not the CAM's numbers
    text = (tmp_path / "report" / "metrics.md").read_text()
    assert "refined: refined_boxes and the mask_rle mask of a --refine run (4 images" in text


def test_refined_labels_with_coco_boxes_have_no_pixel_metrics(tmp_path):
    rows, truths, _, boxes = refined_fixture()
    out = write_output(tmp_path / "out", rows)
    coco = {"images": [], "annotations": []}
    for k, (image_id, truth) in enumerate(truths.items()):
        x0, y0, x1, y1 = np_box(truth)
        coco["images"].append({"id": k, "file_name": f"{image_id}.jpg", "width": 80, "height": 60})
        coco["annotations"].append({"id": k, "image_id": k, "bbox": [int(x0), int(y0), int(x1 - x0), int(y1 - y0)]})
    (tmp_path / "boxes.json").write_text(json.dumps(coco))
    refined = evaluate_output(str(out), boxes=str(tmp_path / "boxes.json"), write=False)["refined"]
    assert refined["pxap"] is None and refined["jaccard_mean"] is None and refined["jaccard_isic2018"] is None
    first = [oracle_iou(boxes[i][0], np_box(truths[i])) if boxes[i] else 0.0 for i in truths]
    assert refined["mean_iou"] == pytest.approx(100 * np.mean(first))


# --------------------------------------------------------------------------- schema versions
def write_v1(path: Path, rows: list[dict]) -> None:
    """A Parquet file as schema version 1 wrote it: without mask_rle, refined_boxes, refine and probs."""
    fields = [f for f in CAMS_SCHEMA if f.name not in ("mask_rle", "refined_boxes", "refine", "probs")]
    schema = pa.schema(fields, metadata={"camjobs.schema_version": "1"})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{**r, "schema_version": 1} for r in rows], schema=schema), path)


def test_version_1_outputs_still_evaluate(tmp_path):
    images = random_images(3, 5)
    _, masks = write_images(tmp_path / "v2", images)
    v1_run, v2_run = "20260101T000000Z-aaaaaa", "20260201T000000Z-bbbbbb"
    rows = [
        cams_row(
            im["image_id"],
            im["cam"],
            im["width"],
            im["height"],
            threshold=0.2,
            label=im["label"],
            pred_label=im["pred_label"],
            target_label=im["target_label"],
            run_id=v1_run,
        )
        for im in images
    ]
    out = tmp_path / "out"
    write_v1(out / "cams" / v1_run / "part-00000.parquet", rows)
    assert "refine" not in pq.read_schema(out / "cams" / v1_run / "part-00000.parquet").names
    old = evaluate_output(str(out), masks=str(masks), write=False, image_baselines=False)
    assert all(value is None for value in old["refined"].values()) and old["counts"]["refined_images"] == 0
    for im in images:
        im["threshold"] = 0.2
    assert_matches_oracle(old.metrics, oracle_metrics(images))
    # a version-2 --refine run beside it: the newest run's settings (refine included) pick its rows,
    # and the version-1 run still evaluates by its run id
    refined_rows = [
        {
            **r,
            "run_id": v2_run,
            "refine": "cam-blue-otsu-1",
            "mask_rle": coco_rle(np.ones((r["height"], r["width"]), bool)),
        }
        for r in rows[:3]
    ]
    write_output(out, refined_rows)
    new = evaluate_output(str(out), masks=str(masks), write=False, image_baselines=False)
    assert new["settings"]["runs"] == [v2_run] and new["counts"]["images"] == 3 == new["counts"]["refined_images"]
    assert new["refined"]["jaccard_mean"] == pytest.approx(new["constant_baseline"]["jaccard_mean"])  # all-ones masks
    again = evaluate_output(str(out), masks=str(masks), run_id=v1_run, write=False, image_baselines=False)
    assert again["counts"]["refined_images"] == 0 and again["mean_iou"] == pytest.approx(old["mean_iou"])
