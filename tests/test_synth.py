"""Tests for camjobs.synth and camjobs.synth_image: the synthetic HAM10000-layout dermoscopy generator."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from camjobs.geometry import box_iou, centre_box
from camjobs.geometry import mask_box as mask_bbox
from camjobs.synth import (
    DEFAULT_CLASSES,
    FIRST_IMAGE_NUMBER,
    HAM10000_CLASSES,
    LOCALIZATIONS,
    SynthSummary,
    synth_dataset,
)
from camjobs.synth_image import render_image

W, H = 600, 450
N = 60
IMAGE_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
MASK_DIR = "HAM10000_segmentations_lesion_tschandl"
COLUMNS = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        rd = csv.DictReader(f)
        assert rd.fieldnames == COLUMNS
        return list(rd)


def _image_path(root: Path, image_id: str) -> Path:
    paths = [root / d / f"{image_id}.jpg" for d in IMAGE_DIRS if (root / d / f"{image_id}.jpg").exists()]
    assert len(paths) == 1, (image_id, paths)
    return paths[0]


def _mask_path(root: Path, image_id: str) -> Path:
    return root / MASK_DIR / f"{image_id}_segmentation.png"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[SynthSummary, list[dict[str, str]]]:
    root = tmp_path_factory.mktemp("ham")
    summary = synth_dataset(root, n=N, seed=0)
    return summary, _read_csv(summary.metadata_csv)


@pytest.fixture(scope="module")
def decoded(dataset):
    """image_id -> (dx, rgb image, boolean mask)."""
    summary, rows = dataset
    out = {}
    for r in rows:
        img = cv2.imread(str(_image_path(summary.out_dir, r["image_id"])), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(_mask_path(summary.out_dir, r["image_id"])), cv2.IMREAD_UNCHANGED)
        out[r["image_id"]] = (r["dx"], img[..., ::-1], mask)
    return out


# ----------------------------------------------------------------------------- layout
def test_layout_dirs_and_csv(dataset):
    summary, rows = dataset
    root = summary.out_dir
    assert summary.metadata_csv == root / "HAM10000_metadata.csv"
    for d in (*IMAGE_DIRS, MASK_DIR):
        assert (root / d).is_dir()
    first_line = summary.metadata_csv.read_text().splitlines()[0]
    assert first_line == ",".join(COLUMNS)
    assert len(rows) == N == summary.n

    ids = [r["image_id"] for r in rows]
    assert len(set(ids)) == N
    assert all(re.fullmatch(r"ISIC_\d{7}", i) for i in ids)
    nums = sorted(int(i[5:]) for i in ids)
    assert nums == list(range(FIRST_IMAGE_NUMBER, FIRST_IMAGE_NUMBER + N))  # starts at ISIC_0024306
    assert all(re.fullmatch(r"HAM_\d{7}", r["lesion_id"]) for r in rows)

    # files: exactly one jpg per row, split ~half/half, first half of the ids in part_1
    part1 = sorted(p.stem for p in (root / IMAGE_DIRS[0]).glob("*.jpg"))
    part2 = sorted(p.stem for p in (root / IMAGE_DIRS[1]).glob("*.jpg"))
    assert sorted(part1 + part2) == sorted(ids)
    assert abs(len(part1) - len(part2)) <= 1
    assert max(part1) < min(part2)
    masks = sorted(p.name for p in (root / MASK_DIR).glob("*.png"))
    assert masks == sorted(f"{i}_segmentation.png" for i in ids)


def test_metadata_values(dataset):
    summary, rows = dataset
    assert set(summary.class_counts) == set(DEFAULT_CLASSES) == {"mel", "nv", "bkl"}
    counts = {c: sum(r["dx"] == c for r in rows) for c in DEFAULT_CLASSES}
    assert counts == summary.class_counts
    assert max(counts.values()) - min(counts.values()) <= 3  # balanced-ish
    for r in rows:
        assert r["dx"] in HAM10000_CLASSES
        assert r["dx_type"] in {"histo", "follow_up", "consensus", "confocal"}
        assert r["sex"] in {"male", "female", "unknown"}
        assert r["localization"] in LOCALIZATIONS
        age = float(r["age"])
        assert re.fullmatch(r"\d+\.0", r["age"]) and age % 5 == 0 and 0 <= age <= 85
    # some lesions have 2-3 images; a lesion's images share its metadata
    by_lesion: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_lesion.setdefault(r["lesion_id"], []).append(r)
    sizes = [len(v) for v in by_lesion.values()]
    assert max(sizes) <= 3 and any(s > 1 for s in sizes)
    assert len(by_lesion) < N
    for group in by_lesion.values():
        for key in ("dx", "dx_type", "age", "sex", "localization"):
            assert len({r[key] for r in group}) == 1
    # rows are grouped by lesion (consecutive), as in the real file
    seen, prev = set(), None
    for r in rows:
        if r["lesion_id"] != prev:
            assert r["lesion_id"] not in seen
            seen.add(r["lesion_id"])
            prev = r["lesion_id"]


def test_images_and_masks_decode(decoded):
    for image_id, (_dx, img, mask) in decoded.items():
        assert img.shape == (H, W, 3) and img.dtype == np.uint8
        assert mask.shape == (H, W) and mask.dtype == np.uint8  # single channel, same size
        vals = set(np.unique(mask).tolist())
        assert vals == {0, 255}, (image_id, vals)
        assert (mask > 0).mean() > 0.003


def test_mask_is_where_the_lesion_is(decoded):
    """The lesion differs from the skin just outside its mask (the mask matches the drawing)."""
    diffs = []
    for _dx, img, mask in decoded.values():
        m = mask > 0
        ring = cv2.dilate(mask, np.ones((15, 15), np.uint8)) > 0
        ring &= ~m
        inside = img[m].astype(float).mean(0)
        outside = img[ring].astype(float).mean(0)
        diffs.append(np.abs(inside - outside).sum())
    assert np.median(diffs) > 40


# ----------------------------------------------------------------------------- placement
def test_lesion_placement_spread(decoded):
    boxes = [mask_bbox(mask) for _dx, _img, mask in decoded.values()]
    assert all(b is not None for b in boxes)
    cx = np.array([(b[0] + b[2]) / 2 / W for b in boxes])
    cy = np.array([(b[1] + b[3]) / 2 / H for b in boxes])
    central = (np.abs(cx - 0.5) < 0.1) & (np.abs(cy - 0.5) < 0.1)
    assert central.mean() < 0.3
    assert cx.std() > 0.12 and cy.std() > 0.1
    assert cx.min() < 0.3 and cx.max() > 0.7 and cy.min() < 0.3 and cy.max() > 0.7
    cb = centre_box(W, H)
    ious = np.array([box_iou(b, cb) for b in boxes])
    assert ious.mean() < 0.4
    # lesions are (mostly) inside the frame: boxes are not degenerate slivers at the border
    for b in boxes:
        assert b[2] - b[0] > 20 and b[3] - b[1] > 20


def test_box_helpers():
    assert centre_box(600, 450) == (150.0, 112.5, 450.0, 337.5)
    assert centre_box(100, 100, frac=1.0) == (0.0, 0.0, 100.0, 100.0)
    with pytest.raises(ValueError):
        centre_box(10, 10, frac=0.0)
    m = np.zeros((10, 20), np.uint8)
    assert mask_bbox(m) is None
    m[2:5, 3:9] = 255
    assert mask_bbox(m) == (3, 2, 9, 5)
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == pytest.approx(1.0)
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0


# ----------------------------------------------------------------------------- classes
def test_class_dependent_appearance(decoded):
    stats: dict[str, dict[str, list[float]]] = {}
    for dx, img, mask in decoded.values():
        m = mask > 0
        lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB)
        s = stats.setdefault(dx, {"area": [], "L": [], "Lstd": []})
        s["area"].append(m.mean())
        s["L"].append(lab[..., 0][m].mean())
        s["Lstd"].append(lab[..., 0][m].std())
    mean = {dx: {k: float(np.mean(v)) for k, v in s.items()} for dx, s in stats.items()}
    # melanoma: larger, darker and more variegated than the common nevus
    assert mean["mel"]["area"] > 1.3 * mean["nv"]["area"]
    assert mean["mel"]["L"] < mean["nv"]["L"] - 10
    assert mean["mel"]["Lstd"] > mean["nv"]["Lstd"]
    # benign keratosis: lighter (tan) than the nevus
    assert mean["bkl"]["L"] > mean["nv"]["L"] + 10


def test_confounders_independent_of_class(decoded):
    """The skin around the lesion has no class signal in its mean brightness."""
    by_dx: dict[str, list[float]] = {}
    for dx, img, mask in decoded.values():
        by_dx.setdefault(dx, []).append(img[mask == 0].mean())
    means = [np.mean(v) for v in by_dx.values()]
    assert max(means) - min(means) < 25


def test_render_image_all_classes():
    for i, dx in enumerate(HAM10000_CLASSES):
        rgb, mask = render_image(dx, seed=i, width=320, height=240)
        assert rgb.shape == (240, 320, 3) and rgb.dtype == np.uint8
        assert mask.shape == (240, 320) and set(np.unique(mask).tolist()) == {0, 255}
    with pytest.raises(ValueError):
        render_image("xyz", seed=0)
    # same lesion seed, different view seed: same lesion class look, different placement
    _, m1 = render_image("mel", seed=1, lesion_seed=7)
    _, m2 = render_image("mel", seed=2, lesion_seed=7)
    assert mask_bbox(m1) != mask_bbox(m2)
    assert abs(int((m1 > 0).sum()) - int((m2 > 0).sum())) < 0.4 * (m1 > 0).sum()


# ----------------------------------------------------------------------------- determinism
def _snapshot(root: Path) -> tuple[bytes, dict[str, np.ndarray]]:
    csv_bytes = (root / "HAM10000_metadata.csv").read_bytes()
    arrays = {}
    for p in sorted(root.rglob("*.jpg")) + sorted(root.rglob("*.png")):
        arrays[p.relative_to(root).as_posix()] = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    return csv_bytes, arrays


def test_deterministic_for_seed(tmp_path):
    a = synth_dataset(tmp_path / "a", n=8, seed=5)
    b = synth_dataset(tmp_path / "b", n=8, seed=5)
    c = synth_dataset(tmp_path / "c", n=8, seed=6)
    csv_a, arr_a = _snapshot(a.out_dir)
    csv_b, arr_b = _snapshot(b.out_dir)
    csv_c, arr_c = _snapshot(c.out_dir)
    assert csv_a == csv_b
    assert arr_a.keys() == arr_b.keys() and len(arr_a) == 16
    for k in arr_a:
        assert np.array_equal(arr_a[k], arr_b[k]), k
    assert a.class_counts == b.class_counts
    assert csv_a != csv_c
    common = arr_a.keys() & arr_c.keys()
    assert common and all(not np.array_equal(arr_a[k], arr_c[k]) for k in common)


def test_custom_classes_and_size(tmp_path):
    s = synth_dataset(tmp_path, n=7, seed=1, classes=HAM10000_CLASSES, width=320, height=240)
    assert set(s.class_counts) == set(HAM10000_CLASSES)
    assert sum(s.class_counts.values()) == 7
    rows = _read_csv(s.metadata_csv)
    for r in rows:
        img = cv2.imread(str(_image_path(tmp_path, r["image_id"])))
        mask = cv2.imread(str(_mask_path(tmp_path, r["image_id"])), cv2.IMREAD_UNCHANGED)
        assert img.shape == (240, 320, 3) and mask.shape == (240, 320)


def test_progress_bar(tmp_path, capsys):
    s = synth_dataset(tmp_path, n=2, seed=0, progress=True)
    assert s.n == 2
    assert "synth" in capsys.readouterr().err


# ----------------------------------------------------------------------------- errors
def test_bad_layout_raises(tmp_path):
    with pytest.raises(ValueError, match="ham10000"):
        synth_dataset(tmp_path / "x", layout="isic2019", n=2)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "kwargs",
    [dict(classes=("mel", "melanoma")), dict(classes=()), dict(classes=("nv", "nv")), dict(n=0)],
)
def test_bad_arguments_raise(tmp_path, kwargs):
    with pytest.raises(ValueError):
        synth_dataset(tmp_path / "x", **kwargs)


def test_no_ray_or_torch_import():
    code = "import sys, camjobs.synth; assert not {'ray', 'torch'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
