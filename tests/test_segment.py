"""Lesion masks from the image: the Otsu baseline, the CAM-guided refinement, COCO RLE and boxes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from pycocotools import mask as coco_mask

from camjobs.geometry import component_boxes, mask_box, mask_jaccard, resize_mask, rle_area, rle_decode, rle_encode
from camjobs.segment import REFINE_SIDE, otsu_lesion_mask, refine, to_work, work_size


def _skin(width: int = 400, height: int = 300, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.float32)
    image[:] = (225, 185, 165)  # pale skin, RGB
    image += rng.normal(0, 4, image.shape)
    return image


def _blob(image: np.ndarray, centre: tuple[int, int], axes: tuple[int, int], colour=(120, 80, 50)) -> np.ndarray:
    mask = np.zeros(image.shape[:2], np.uint8)
    cv2.ellipse(mask, centre, axes, 20, 0, 360, 1, -1)
    image[mask > 0] = colour
    return mask > 0


def _uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(image, 0, 255).astype(np.uint8)


def _gaussian_map(width: int, height: int, centre: tuple[int, int], sigma: float) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    return np.exp(-((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2) / (2 * sigma**2)).astype(np.float32)


def _refine(rgb: np.ndarray, norm: np.ndarray) -> np.ndarray | None:
    height, width = rgb.shape[:2]
    work = to_work(rgb, REFINE_SIDE)
    small = cv2.resize(norm, work.shape[1::-1], interpolation=cv2.INTER_LINEAR)
    return refine(work, small, width, height)


# --------------------------------------------------------------------------- RLE and boxes
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (300, 400), (333, 1)])
def test_rle_round_trip_through_pycocotools(shape):
    rng = np.random.default_rng(sum(shape))
    mask = rng.random(shape) < 0.3
    rle = rle_encode(mask)
    assert rle["size"] == list(shape) and isinstance(rle["counts"], str)
    # pycocotools reads what camjobs writes, and camjobs reads what pycocotools writes
    decoded = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    assert decoded.shape == shape and np.array_equal(decoded.astype(bool), mask)
    theirs = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert np.array_equal(rle_decode(theirs), mask)
    assert rle_area(rle) == int(mask.sum()) == int(coco_mask.area(theirs))


def test_rle_decode_reads_uncompressed_counts():
    mask = np.zeros((4, 3), bool)
    mask[1:3, 1] = True  # column-major runs: 5 zeros, 2 ones, 5 zeros
    assert np.array_equal(rle_decode({"size": [4, 3], "counts": [5, 2, 5]}), mask)


def test_rle_encode_refuses_a_colour_image():
    with pytest.raises(ValueError, match="2-D"):
        rle_encode(np.zeros((4, 4, 3), bool))


def test_component_boxes_match_each_components_pixels():
    mask = np.zeros((50, 60), bool)
    mask[5:10, 5:25] = True  # 100 pixels
    mask[30:45, 40:50] = True  # 150 pixels
    mask[48, 0] = True  # 1 pixel
    score = np.linspace(0, 1, mask.size).reshape(mask.shape)
    boxes = component_boxes(mask, score)
    count, labels = cv2.connectedComponents(mask.view(np.uint8), connectivity=8)
    expected = []
    for label in range(1, count):
        pixels = labels == label
        expected.append((int(pixels.sum()), mask_box(pixels), float(score[pixels].mean())))
    expected.sort(key=lambda item: -item[0])
    assert [(b["x_min"], b["y_min"], b["x_max"], b["y_max"]) for b in boxes] == [e[1] for e in expected]
    assert [b["score"] for b in boxes] == pytest.approx([e[2] for e in expected])
    # a column-major mask (what the refinement makes, for COCO's encoder) gives the same boxes
    column_major = component_boxes(np.asfortranarray(mask), score)
    assert len(column_major) == len(boxes)
    for got, want in zip(column_major, boxes):
        assert got == pytest.approx(want)
    assert component_boxes(np.zeros((3, 3), bool), np.ones((3, 3))) == []


def test_resize_mask_keeps_a_shape_across_sizes():
    mask = np.zeros((100, 200), bool)
    mask[20:80, 50:150] = True
    for width, height in ((2000, 1000), (50, 25), (200, 100)):
        resized = resize_mask(mask, width, height)
        back = resize_mask(resized, 200, 100)
        assert resized.shape == (height, width) and mask_jaccard(back, mask) > 0.95


# --------------------------------------------------------------------------- the refinement
def test_the_map_decides_which_lesion_the_image_its_outline():
    image = _skin()
    left = _blob(image, (110, 150), (60, 45))
    right = _blob(image, (300, 140), (55, 50))
    rgb = _uint8(image)
    for lesion, centre in ((left, (110, 150)), (right, (300, 140))):
        norm = _gaussian_map(400, 300, centre, 40)  # a blurry map, peaked on one lesion
        mask = _refine(rgb, norm)
        assert mask.shape == lesion.shape
        assert mask_jaccard(mask, lesion) > 0.9


def test_a_faint_lesion_inside_a_dark_dermoscope_rim():
    image = _skin(seed=1)
    height, width = image.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width]
    outside = ((xs - width / 2) / (width * 0.62)) ** 2 + ((ys - height / 2) / (height * 0.62)) ** 2 > 1
    image[outside] = 20  # the black corners of a round field of view
    lesion = _blob(image, (200, 150), (45, 35), colour=(185, 140, 115))  # a light brown naevus
    rgb = _uint8(image)
    flat_ish = _gaussian_map(width, height, (200, 150), 400)  # the map barely prefers anything
    assert mask_jaccard(_refine(rgb, flat_ish), lesion) > 0.85
    # the Otsu baseline on the grey image takes the dark corners: the case the rim rule is for
    assert mask_jaccard(otsu_lesion_mask(rgb), lesion) < 0.5


def test_hair_across_a_lesion_is_lifted():
    image = _skin(seed=2)
    lesion = _blob(image, (200, 150), (70, 50))
    for x in range(20, 400, 37):  # dark hairs, two pixels wide, crossing lesion and skin
        cv2.line(image, (x, 0), (x + 60, 299), (40, 30, 25), 2)
    mask = _refine(_uint8(image), _gaussian_map(400, 300, (200, 150), 80))
    assert mask_jaccard(mask, lesion) > 0.85


@pytest.mark.parametrize("norm", [np.zeros((30, 40), np.float32), np.full((30, 40), 0.7, np.float32)])
def test_an_empty_or_flat_map_gives_no_mask(norm):
    image = _skin()
    _blob(image, (200, 150), (60, 45))
    assert refine(to_work(_uint8(image), REFINE_SIDE), norm, 400, 300) is None


def test_an_image_without_contrast_gives_no_mask():
    rgb = np.full((90, 120, 3), 200, np.uint8)
    assert refine(rgb, _gaussian_map(120, 90, (60, 45), 20), 120, 90) is None
    assert otsu_lesion_mask(rgb) is None


def test_working_size_follows_from_the_original_size():
    rgb = np.zeros((3000, 4000, 3), np.uint8)
    assert to_work(rgb, REFINE_SIDE).shape[:2] == work_size(4000, 3000, REFINE_SIDE)[::-1] == (150, 200)
    # a reduced decode of a 4001 x 2999 photograph still gives the working size of the original
    assert to_work(np.zeros((375, 500, 3), np.uint8), REFINE_SIDE, (4001, 2999)).shape[:2] == (150, 200)
    assert to_work(np.zeros((50, 60, 3), np.uint8), REFINE_SIDE).shape[:2] == (50, 60)


def test_refined_masks_of_real_images_beat_the_otsu_baseline(isic2017_sample):
    """Real dermoscopy (vignettes, hair, rulers) with a map that knows nothing: a blurry centre."""
    images = sorted((isic2017_sample / "ISIC-2017_Training_Data").glob("*.jpg"))[::5]
    refined, otsu = [], []
    for path in images:
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        truth_path = isic2017_sample / "ISIC-2017_Training_Part1_GroundTruth" / f"{path.stem}_segmentation.png"
        truth = cv2.imread(str(truth_path), cv2.IMREAD_GRAYSCALE) > 127
        height, width = truth.shape
        mask = _refine(rgb, _gaussian_map(width, height, (width // 2, height // 2), max(width, height)))
        refined.append(0.0 if mask is None else mask_jaccard(mask, truth))
        baseline = otsu_lesion_mask(rgb)
        otsu.append(0.0 if baseline is None else mask_jaccard(baseline, truth))
    assert len(images) == 30
    assert np.mean(refined) >= 0.8 and np.mean(refined) >= np.mean(otsu) + 0.03
