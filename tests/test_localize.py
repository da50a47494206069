"""Upsampling, heatmap and boxes against independent implementations."""

from __future__ import annotations

from collections import deque

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from camjobs.pipeline.localize import boxes_from_normalized, heatmap_uint8, localize, normalized, upsample


def components_by_flood_fill(mask: np.ndarray) -> list[tuple[int, int, int, int, int]]:
    """Oracle: 8-connected components by breadth-first search -> (area, x0, y0, x1, y1, pixels)."""
    seen = np.zeros_like(mask, dtype=bool)
    found = []
    height, width = mask.shape
    for sy, sx in zip(*np.nonzero(mask)):
        if seen[sy, sx]:
            continue
        queue, pixels = deque([(sy, sx)]), []
        seen[sy, sx] = True
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        ys, xs = zip(*pixels)
        found.append((len(pixels), min(xs), min(ys), max(xs) + 1, max(ys) + 1, (np.array(ys), np.array(xs))))
    return sorted(found, key=lambda c: -c[0])


def test_upsample_matches_torch_bilinear_without_corner_alignment():
    for cam, (height, width) in (
        (torch.randn(7, 9), (50, 80)),
        (torch.randn(7, 7), (450, 600)),
        (torch.randn(7, 7), (5, 4)),
    ):
        upsampled = upsample(cam, height, width)
        expected = F.interpolate(cam[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        assert upsampled.dtype == np.float32 and upsampled.shape == (height, width)
        np.testing.assert_allclose(upsampled, expected.numpy(), atol=1e-5)
    np.testing.assert_array_equal(upsample(np.ones((1, 1)), 3, 2), np.ones((3, 2), np.float32))


def test_localize_stage_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, camjobs.pipeline.localize; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_heatmap_is_rounded_fraction_of_peak():
    norm = normalized(torch.tensor([[-1.0, 0.0, 0.5], [1.0, 2.0, 4.0]]))
    np.testing.assert_array_equal(heatmap_uint8(norm), [[0, 0, 32], [64, 128, 255]])


def test_boxes_are_components_largest_first_with_mean_score():
    rng = np.random.default_rng(3)
    cam = torch.from_numpy(rng.normal(size=(6, 8)).astype(np.float32))
    norm = normalized(upsample(cam, 60, 90))
    boxes = boxes_from_normalized(norm, 0.2)
    mask = norm >= 0.2
    oracle = components_by_flood_fill(mask)
    assert len(boxes) == len(oracle) >= 2
    for box, (area, *_rest) in zip(boxes, oracle):
        assert (box.x_max - box.x_min) * (box.y_max - box.y_min) >= area
    # Largest first; equal areas may come in either order, so compare the largest exactly.
    assert (boxes[0].x_min, boxes[0].y_min, boxes[0].x_max, boxes[0].y_max) == oracle[0][1:5]
    # score: mean of U / max U over the component's own pixels.
    assert abs(boxes[0].score - float(norm[oracle[0][5]].mean())) < 1e-5
    assert all(0.2 <= b.score <= 1.0 for b in boxes)


def test_box_convention_is_exclusive_and_in_bounds():
    cam = torch.zeros(4, 4)
    cam[1, 2] = 1.0
    located = localize(cam, 40, 40, 0.2)
    box = located.boxes[0]
    assert 0 <= box.x_min < box.x_max <= 40 and 0 <= box.y_min < box.y_max <= 40
    region = located.heatmap >= 51
    ys, xs = np.nonzero(region)
    # heatmap >= 51 is (up to rounding) the thresholded region; its extent is the box.
    assert abs(xs.min() - box.x_min) <= 1 and abs(xs.max() + 1 - box.x_max) <= 1
    assert abs(ys.min() - box.y_min) <= 1 and abs(ys.max() + 1 - box.y_max) <= 1


def test_no_positive_evidence_means_no_boxes():
    for cam in (torch.zeros(3, 3), -torch.ones(3, 3)):
        located = localize(cam, 10, 12)
        assert located.boxes == [] and located.heatmap.shape == (10, 12) and located.heatmap.max() == 0


def test_whole_map_above_threshold_is_one_full_box():
    located = localize(torch.ones(5, 5), 30, 20)
    assert [(b.x_min, b.y_min, b.x_max, b.y_max) for b in located.boxes] == [(0, 0, 20, 30)]
    assert abs(located.boxes[0].score - 1.0) < 1e-6


_BATCH_SHAPES = [(7, 7, 450, 600, 0.2), (5, 9, 90, 40, 0.5), None, (7, 7, 30, 30, 0.2), None]


def _model_rows(shapes):
    """The model actor's rows (schema.RESULT_SCHEMA): a map per shape, an error row per None."""
    import pyarrow as pa

    from camjobs.schema import RESULT_SCHEMA

    rng = np.random.default_rng(3)
    rows = []
    for i, shape in enumerate(shapes):
        row = {name: None for name in RESULT_SCHEMA.names}
        row.update(image_id=f"img{i}", skipped=False)
        if shape is None:
            row.update(error_type="decode_error", error_message="corrupt")
        else:
            h, w, height, width, threshold = shape
            cam = rng.normal(size=(h, w)).astype(np.float32) + np.linspace(-1, 2, h * w, dtype=np.float32).reshape(h, w)
            if i == 3:
                cam = -np.abs(cam)  # no positive evidence: an empty heatmap, no box
            row.update(
                cam=cam.ravel().tolist(), cam_height=h, cam_width=w, height=height, width=width, threshold=threshold
            )
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def test_localize_batch_fills_rows_with_maps_and_leaves_the_rest():
    from camjobs.pipeline.localize import localize_batch
    from camjobs.schema import RESULT_SCHEMA

    shapes = _BATCH_SHAPES
    table = _model_rows(shapes)
    result = localize_batch(table)
    assert result.schema == RESULT_SCHEMA and result.num_rows == len(shapes)
    for row, shape in zip(result.to_pylist(), shapes):
        if shape is None:
            assert row["heatmap_png"] is None and row["boxes"] is None and row["error_type"] == "decode_error"
            continue
        h, w, height, width, threshold = shape
        cam = np.asarray(row["cam"], np.float32).reshape(h, w)
        heatmap = cv2.imdecode(np.frombuffer(row["heatmap_png"], np.uint8), cv2.IMREAD_UNCHANGED)
        # Oracle: OpenCV's bilinear resize and its connected components on the row's own map.
        upsampled = cv2.resize(cam, (width, height), interpolation=cv2.INTER_LINEAR)
        peak = upsampled.max()
        expected = np.floor(255 * np.clip(upsampled / peak, 0, 1) + 0.5) if peak > 0 else np.zeros_like(upsampled)
        assert heatmap.shape == (height, width) and np.abs(heatmap.astype(int) - expected).max() <= 1
        if peak <= 0:
            assert row["boxes"] == []
            continue
        count, _, stats, _ = cv2.connectedComponentsWithStats(
            (upsampled >= threshold * peak).astype(np.uint8), connectivity=8
        )
        assert abs(len(row["boxes"]) - (count - 1)) <= 1  # bilinear rounding may split or join a sliver
        x, y, bw, bh, _ = stats[1 + np.argmax(stats[1:, cv2.CC_STAT_AREA])]
        first = row["boxes"][0]
        got = [first["x_min"], first["y_min"], first["x_max"], first["y_max"]]
        assert np.abs(np.array(got) - [x, y, x + bw, y + bh]).max() <= 1 and threshold <= first["score"] <= 1


def test_localize_batch_on_slices_and_chunks_gives_the_rows_of_the_whole_table():
    """Ray Data hands the stage zero-copy slices of a block (offsets not starting at 0) and
    tables of several chunks: each row must come out as it does from the whole table."""
    import pyarrow as pa

    from camjobs.pipeline.localize import localize_batch

    table = _model_rows(_BATCH_SHAPES)
    whole = localize_batch(table).to_pylist()
    for start, length in ((1, 3), (2, 3), (3, 2), (4, 1)):
        assert localize_batch(table.slice(start, length)).to_pylist() == whole[start : start + length]
    chunked = pa.concat_tables([table.slice(0, 2), table.slice(2, 2), table.slice(4)])
    assert chunked.column("cam").num_chunks == 3
    assert localize_batch(chunked).to_pylist() == whole


def test_localize_batch_on_an_empty_table():
    from camjobs.pipeline.localize import localize_batch
    from camjobs.schema import RESULT_SCHEMA

    empty = RESULT_SCHEMA.empty_table()
    assert localize_batch(empty).num_rows == 0


def test_component_boxes_and_scores_match_flood_fill_for_few_and_for_many_components():
    """Both ways of measuring components: one mask each (a few components, here nested
    rings whose boxes overlap, and two blobs) and one pass over the labels (many dots)."""
    from camjobs.geometry import _FEW_COMPONENTS

    yy, xx = np.mgrid[0:61, 0:81]
    radius = np.hypot(yy - 30, xx - 40)
    rings = np.where((radius.astype(int) // 4) % 2 == 0, 0.3 + 0.7 * np.cos(radius / 9) ** 2, 0.0).astype(np.float32)
    rings[30, 40] = 1.0
    blobs = np.zeros((61, 81), np.float32)
    blobs[5:15, 5:25], blobs[40:58, 50:70] = 0.6, 0.9
    dots = np.zeros((61, 81), np.float32)
    dots[1::4, 2::5] = np.linspace(0.25, 1.0, dots[1::4, 2::5].size).reshape(dots[1::4, 2::5].shape)
    dots[1::4, 3::5] = 0.5  # two-pixel dots of unequal sizes and means
    dots[1::8, 3::5] = 0.0
    for norm, many in ((rings, False), (blobs, False), (dots, True)):
        boxes = boxes_from_normalized(norm, 0.2)
        oracle = components_by_flood_fill(norm >= 0.2)
        assert len(boxes) == len(oracle) >= 2 and (len(oracle) > _FEW_COMPONENTS) == many
        by_box = {(b.x_min, b.y_min, b.x_max, b.y_max): b.score for b in boxes}
        assert len(by_box) == len(oracle)
        for _area, x0, y0, x1, y1, pixels in oracle:
            assert abs(by_box[(x0, y0, x1, y1)] - float(norm[pixels].astype(np.float64).mean())) < 1e-6
        area_of = {(x0, y0, x1, y1): area for area, x0, y0, x1, y1, _ in oracle}
        areas = [area_of[(b.x_min, b.y_min, b.x_max, b.y_max)] for b in boxes]
        assert areas == sorted(areas, reverse=True)  # largest component first
    widths = [b.x_max - b.x_min for b in boxes_from_normalized(rings, 0.2)]
    assert sum(widths) * 61 > rings.size  # the rings' boxes overlap


def test_heatmap_max_side_shrinks_only_large_heatmaps_and_keeps_full_size_boxes():
    import pyarrow as pa

    from camjobs.pipeline.localize import localize_batch, shrink_heatmap
    from camjobs.schema import RESULT_SCHEMA

    heatmap = np.tile((np.arange(300) % 256).astype(np.uint8)[None, :], (200, 1))
    assert shrink_heatmap(heatmap, None) is heatmap and shrink_heatmap(heatmap, 300) is heatmap
    small = shrink_heatmap(heatmap, 150)
    assert small.shape == (100, 150)
    np.testing.assert_array_equal(small, cv2.resize(heatmap, (150, 100), interpolation=cv2.INTER_AREA))

    cam = np.zeros((7, 7), np.float32)
    cam[2:4, 3:5] = 1.0
    row = {name: None for name in RESULT_SCHEMA.names}
    row.update(
        image_id="big",
        skipped=False,
        cam=cam.ravel().tolist(),
        cam_height=7,
        cam_width=7,
        height=1500,
        width=2000,
        threshold=0.2,
    )
    table = pa.Table.from_pylist([row], schema=RESULT_SCHEMA)
    full, reduced = localize_batch(table).to_pylist()[0], localize_batch(table, heatmap_max_side=500).to_pylist()[0]
    decoded = cv2.imdecode(np.frombuffer(reduced["heatmap_png"], np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.shape == (375, 500) and len(reduced["heatmap_png"]) < len(full["heatmap_png"])
    assert reduced["boxes"] == full["boxes"]  # found at full size, in full-size pixels
    assert full["boxes"][0]["x_max"] > 500


def test_localize_batch_refines_rows_keeps_cam_rows_when_a_refinement_fails(isic2017_mini, tmp_path):
    """--refine: mask and boxes as segment.refine gives them; an empty map and a broken working
    image leave the mask null and the CAM columns as they are without --refine."""
    import pyarrow as pa

    from camjobs.geometry import component_boxes, rle_decode
    from camjobs.pipeline.localize import localize_batch, normalized, upsample
    from camjobs.schema import RESULT_SCHEMA
    from camjobs.segment import REFINE_METHOD, REFINE_SIDE, refine, to_work

    path = sorted((isic2017_mini / "ISIC-2017_Training_Data").glob("*.jpg"))[0]
    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    height, width = rgb.shape[:2]
    work = to_work(rgb, REFINE_SIDE)
    table = _model_rows([(7, 7, height, width, 0.2)] * 4 + [None])
    pixels = [work.tobytes(), b"\x00" * 10, None, work.tobytes(), None]  # row 3's map is all negative
    table = table.set_column(
        RESULT_SCHEMA.get_field_index("refine_pixels"), "refine_pixels", pa.array(pixels, pa.binary())
    )
    plain = localize_batch(table).to_pylist()
    refined = localize_batch(table, refine_method=REFINE_METHOD).to_pylist()
    assert all(row["refine_pixels"] is None for row in refined)  # used up, not carried to the sink
    for _index, (before, after) in enumerate(zip(plain, refined)):
        for name in ("heatmap_png", "boxes", "cam", "error_type"):
            assert after[name] == before[name], name
        assert before["mask_rle"] is None and before["refine"] is None
    good, broken, missing, empty, error = refined
    cam = np.asarray(good["cam"], np.float32).reshape(7, 7)
    expected = refine(work, normalized(upsample(cam, *work.shape[:2])), width, height)
    mask = rle_decode(good["mask_rle"])
    assert good["mask_rle"]["size"] == [height, width] and np.array_equal(mask, expected)
    oracle = component_boxes(expected, normalized(upsample(cam, height, width)))
    assert len(good["refined_boxes"]) == len(oracle) >= 1
    for got, want in zip(good["refined_boxes"], oracle):
        assert got == pytest.approx(want, rel=1e-6)  # float32 in the table
    assert good["refine"] == REFINE_METHOD and good["refine_error"] is None
    assert (
        empty["mask_rle"] is None and empty["refined_boxes"] is None and empty["refine_error"] is None
    )  # no positive evidence
    for failed in (broken, missing):
        assert failed["mask_rle"] is None and failed["refine"] == REFINE_METHOD and failed["refine_error"]
    assert error["refine"] is None and error["refine_error"] is None

    # the sink writes every image's row, refined or not, and counts the failed refinements
    import pandas as pd

    from camjobs.pipeline.sink import CamParquetSink

    table = localize_batch(table, refine_method=REFINE_METHOD)
    stats = CamParquetSink(str(tmp_path), "run").write([table], None)
    assert (stats.processed, stats.errors, stats.refine_failed) == (4, 1, 2)
    written = pd.read_parquet(tmp_path / "_staging" / "run" / "cams").set_index("image_id")
    assert written.mask_rle.notna().tolist() == [True, False, False, False]
    assert written.boxes.notna().all() and (written.refine == REFINE_METHOD).all()
