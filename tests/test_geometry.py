"""camjobs.geometry's boxes against torchvision's box ops (the convention it follows)."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_convert
from torchvision.ops import box_iou as torchvision_box_iou

from camjobs.geometry import Box, box_iou, box_iou_matrix, xywh_to_xyxy, xyxy_to_cxcywh, xyxy_to_xywh


def _random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    corner = rng.uniform(0, 500, size=(n, 2))
    size = rng.uniform(1, 300, size=(n, 2))
    return np.concatenate([corner, corner + size], axis=1)


def test_box_iou_matrix_is_torchvisions():
    rng = np.random.default_rng(0)
    boxes, others = _random_boxes(rng, 17), _random_boxes(rng, 9)
    expected = torchvision_box_iou(torch.from_numpy(boxes), torch.from_numpy(others)).numpy()
    np.testing.assert_allclose(box_iou_matrix(boxes, others), expected, rtol=1e-12, atol=1e-12)
    assert box_iou(boxes[3], others[5]) == expected[3, 5]


def test_box_iou_of_disjoint_touching_and_empty_boxes():
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # max exclusive: touching shares no pixel
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == 50 / 150
    assert box_iou((3, 3, 3, 3), (3, 3, 3, 3)) == 0.0  # empty union
    assert box_iou_matrix(np.zeros((0, 4)), _random_boxes(np.random.default_rng(1), 3)).shape == (0, 3)


def test_conversions_are_torchvisions():
    rng = np.random.default_rng(2)
    for box in _random_boxes(rng, 5):
        tensor = torch.from_numpy(box[None])
        np.testing.assert_allclose(xyxy_to_xywh(box), box_convert(tensor, "xyxy", "xywh")[0].numpy())
        np.testing.assert_allclose(xyxy_to_cxcywh(box), box_convert(tensor, "xyxy", "cxcywh")[0].numpy())
        np.testing.assert_allclose(xywh_to_xyxy(xyxy_to_xywh(box)), box)


def test_box_is_the_output_struct():
    struct = {"x_min": 1.0, "y_min": 2.0, "x_max": 11.0, "y_max": 7.0, "score": 0.5}
    box = Box.from_struct(struct)
    assert box.as_dict() == struct
    assert box.xyxy == (1.0, 2.0, 11.0, 7.0) and box.area == 50.0
