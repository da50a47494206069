"""camjobs.labels.export: COCO, Label Studio and YOLO exports of DIR/cams, read back by their consumers.

The DIR/cams fixtures are built by hand in CAMS_SCHEMA: images of different sizes, several boxes,
an image without boxes, a non-ASCII image_id with a space and a "/", and one image_id written by
two runs (the newer row must win). Ground truth for COCOeval comes from lesion masks through
camjobs.geometry.mask_box, like the demo's IoU. The refined fixtures (--boxes) draw blobs here and
write them as `camjobs run --refine` does (mask_rle, refined_boxes, refine), beside rows of a run
without --refine and a version-1 file without those columns.
"""

from __future__ import annotations

import contextlib
import csv
import filecmp
import hashlib
import io
import json
from pathlib import Path
from urllib.parse import unquote
from xml.etree import ElementTree

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from camjobs.geometry import mask_box
from camjobs.labels.coco import load_coco_results
from camjobs.labels.export import (
    ExportError,
    export,
    image_url,
    label_config,
    label_config_path,
    plan_export,
    relative_file_name,
)
from camjobs.schema import CAMS_SCHEMA, SCHEMA_VERSION

CLASSES = ["melanoma", "nevus", "seborrheic_keratosis"]
OLD_RUN = "20240101T000000Z-aaaaaa"
NEW_RUN = "20240202T000000Z-bbbbbb"
DATA_ROOT = "/data/derm"
ODD_ID = 'sub dir/Ünïcödé été <1> & "q"'


def _mask(width: int, height: int, centre, axes) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    cv2.ellipse(mask, centre, axes, 0, 0, 360, 255, -1)
    return mask > 127


# image_id -> (width, height, mask); the masks give the ground-truth boxes
MASKS = {
    "ISIC_0000001": _mask(800, 500, (300, 260), (120, 90)),
    ODD_ID: _mask(1022, 767, (500, 400), (200, 150)),
    "ISIC_0000003": _mask(4288, 2848, (2000, 1500), (900, 700)),
    "ISIC_0000002": _mask(600, 450, (310, 220), (100, 80)),
}


def _box(xyxy, score):
    x0, y0, x1, y1 = xyxy
    return {"x_min": float(x0), "y_min": float(y0), "x_max": float(x1), "y_max": float(y1), "score": float(score)}


def _row(image_id, source_path, width, height, boxes, run_id, target="nevus", pred_score=0.8, label=None):
    row = {name: None for name in CAMS_SCHEMA.names}
    row.update(
        image_id=image_id,
        source_path=source_path,
        content_sha256="0" * 64,
        width=width,
        height=height,
        label=label,
        pred_index=CLASSES.index(target),
        pred_label=target,
        pred_score=pred_score,
        target_index=CLASSES.index(target),
        target_label=target,
        method="cam",
        cam=[0.0, 1.0, 2.0, 3.0],
        cam_height=2,
        cam_width=2,
        heatmap_png=b"",
        threshold=0.2,
        boxes=boxes,
        model_sha256=("a" if run_id == OLD_RUN else "b") * 64,
        target_mode="predicted",
        input_size=224,
        run_id=run_id,
        schema_version=SCHEMA_VERSION,
    )
    return row


def _write_run(output: Path, run_id: str, rows: list[dict], summary: dict | None) -> None:
    folder = output / "cams" / run_id
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=CAMS_SCHEMA), folder / "part-0.parquet")
    if summary is not None:
        (output / "runs").mkdir(exist_ok=True)
        (output / "runs" / f"{run_id}.json").write_text(json.dumps(summary))


def gt_box(image_id):
    return mask_box(MASKS[image_id])


def shifted(box, dx):
    return (box[0] + dx, box[1], box[2] + dx, box[3])


@pytest.fixture()
def cams_dir(tmp_path) -> Path:
    """Two runs. Detections: boxes[0] equals the mask box (high scores); extra boxes are misses
    with scores below every hit, so COCO AP is exactly 1 for the boxes[0]s."""
    out = tmp_path / "out"
    old_rows = [
        _row(
            "ISIC_0000001",
            f"{DATA_ROOT}/ISIC-2017_Training_Data/ISIC_0000001.jpg",
            800,
            500,
            [_box(gt_box("ISIC_0000001"), 0.9), _box((700, 10, 790, 60), 0.25)],
            OLD_RUN,
            label="nevus",
        ),
        _row(
            ODD_ID,
            f"{DATA_ROOT}/{ODD_ID}.jpg",
            1022,
            767,
            [_box(gt_box(ODD_ID), 0.8)],
            OLD_RUN,
            target="melanoma",
            pred_score=0.55,
        ),
        _row(
            "ISIC_0000003",
            f"{DATA_ROOT}/ISIC-2017_Training_Data/ISIC_0000003.jpg",
            4288,
            2848,
            [_box(gt_box("ISIC_0000003"), 0.7), _box((10, 10, 400, 333), 0.3), _box((4000, 2600, 4288, 2848), 0.21)],
            OLD_RUN,
            target="seborrheic_keratosis",
            pred_score=0.97,
        ),
        _row("ISIC_0000004", f"{DATA_ROOT}/ISIC-2017_Training_Data/ISIC_0000004.jpg", 640, 480, [], OLD_RUN),
        # superseded by the newer run's row: a box nowhere near the lesion
        _row(
            "ISIC_0000002",
            f"{DATA_ROOT}/ISIC-2017_Training_Data/ISIC_0000002.jpg",
            600,
            450,
            [_box((0, 0, 50, 50), 0.99)],
            OLD_RUN,
        ),
    ]
    _write_run(
        out, OLD_RUN, old_rows, {"run_id": OLD_RUN, "config": {"data": DATA_ROOT + "/"}, "model": {"classes": CLASSES}}
    )
    new_rows = [
        _row("ISIC_0000002", "/elsewhere/ISIC_0000002.jpg", 600, 450, [_box(gt_box("ISIC_0000002"), 0.6)], NEW_RUN)
    ]
    _write_run(out, NEW_RUN, new_rows, None)  # no summary: file name falls back to the base name
    return out


# --------------------------------------------------------------------------- helpers
def test_relative_file_name_rules():
    assert relative_file_name("/data/derm/a/b.jpg", "/data/derm") == "a/b.jpg"
    assert relative_file_name("/data/derm/a/b.jpg", "/data/derm/") == "a/b.jpg"
    assert relative_file_name("/data/dermX/b.jpg", "/data/derm") == "b.jpg"
    assert relative_file_name("/data/derm/a/b.jpg", None) == "b.jpg"
    assert relative_file_name("/data/derm/a/b.jpg", "file:///data/derm") == "a/b.jpg"
    assert relative_file_name("s3://bucket/isic/x/y.jpg", "s3://bucket/isic") == "x/y.jpg"
    # a relative --data, found inside the absolute source path
    assert relative_file_name("/home/u/camjobs-demo/data/HAM/x.jpg", "camjobs-demo/data") == "HAM/x.jpg"
    assert relative_file_name("/home/u/other/x.jpg", "camjobs-demo/data") == "x.jpg"


def test_image_url_quotes_and_joins():
    assert image_url("http://h/img", "a b/é#1.jpg") == "http://h/img/a%20b/%C3%A9%231.jpg"
    assert image_url("http://h/img/", "x.jpg") == "http://h/img/x.jpg"
    assert image_url("/data/local-files/?d=", "d/x.jpg") == "/data/local-files/?d=d/x.jpg"


def test_plan_takes_newest_row_per_image(cams_dir):
    plan = plan_export(str(cams_dir))
    by_id = {image.image_id: image for image in plan.images}
    assert sorted(by_id) == sorted([*MASKS, "ISIC_0000004"])
    assert [image.image_id for image in plan.images] == sorted(by_id)
    newest = by_id["ISIC_0000002"]
    assert newest.run_id == NEW_RUN and newest.file_name == "ISIC_0000002.jpg"
    assert [(b.x_min, b.y_min, b.x_max, b.y_max) for b in newest.boxes] == [tuple(map(float, gt_box("ISIC_0000002")))]
    assert by_id["ISIC_0000001"].file_name == "ISIC-2017_Training_Data/ISIC_0000001.jpg"
    assert by_id[ODD_ID].file_name == f"{ODD_ID}.jpg"
    assert plan.categories == ["lesion"]
    assert plan_export(str(cams_dir), categories="classes").categories == CLASSES


def test_missing_output_and_bad_options(tmp_path, cams_dir):
    with pytest.raises(ExportError, match="cams does not exist"):
        export(str(tmp_path / "nothing"), "coco", str(tmp_path / "x.json"))
    with pytest.raises(ExportError, match="--format"):
        export(str(cams_dir), "voc", str(tmp_path / "x.json"))
    with pytest.raises(ExportError, match="--categories"):
        export(str(cams_dir), "coco", str(tmp_path / "x.json"), categories="dx")


# --------------------------------------------------------------------------- COCO
def _coco_gt(export_json: dict, category_id: int | None = None):
    from pycocotools.coco import COCO

    annotations = []
    for image in export_json["images"]:
        box = mask_box(MASKS[image["camjobs_image_id"]]) if image["camjobs_image_id"] in MASKS else None
        if box is None:
            continue
        x0, y0, x1, y1 = box
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": image["id"],
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": float((x1 - x0) * (y1 - y0)),
                "iscrowd": 0,
                "category_id": category_id or 1,
            }
        )
    gt = COCO()
    gt.dataset = {"images": export_json["images"], "annotations": annotations, "categories": export_json["categories"]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _evaluate(gt, detections) -> np.ndarray:
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(detections)
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def test_coco_export_loads_and_evaluates_with_pycocotools(cams_dir, tmp_path):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO

    target = tmp_path / "exports" / "boxes.json"
    result = export(str(cams_dir), "coco", str(target), image_root="http://files.local/derm")
    assert result.images == 5 and result.boxes == 7 and result.dropped_boxes == 0
    with contextlib.redirect_stdout(io.StringIO()):
        dataset = COCO(str(target))  # the export itself is a loadable COCO dataset
    assert len(dataset.getImgIds()) == 5 and len(dataset.getAnnIds()) == 7
    data = json.loads(target.read_text(encoding="utf-8"))
    images = {image["camjobs_image_id"]: image for image in data["images"]}
    ids = [image["id"] for image in data["images"]]
    assert len(set(ids)) == 5 and all(isinstance(i, int) and 1 <= i < 2**53 for i in ids)
    assert [image["camjobs_image_id"] for image in data["images"]] == sorted(images)
    assert images["ISIC_0000003"]["width"] == 4288 and images["ISIC_0000003"]["height"] == 2848
    assert images[ODD_ID]["file_name"] == f"{ODD_ID}.jpg"
    assert unquote(images[ODD_ID]["coco_url"]) == f"http://files.local/derm/{ODD_ID}.jpg"
    assert " " not in images[ODD_ID]["coco_url"]
    assert data["categories"] == [{"id": 1, "name": "lesion", "supercategory": "lesion"}]
    for annotation in data["annotations"]:
        x, y, w, h = annotation["bbox"]
        assert annotation["area"] == pytest.approx(w * h) and annotation["iscrowd"] == 0 and w > 0 and h > 0
    first = [a for a in data["annotations"] if a["image_id"] == images["ISIC_0000001"]["id"]]
    assert [a["bbox"] for a in first] == [
        [
            *gt_box("ISIC_0000001")[:2],
            gt_box("ISIC_0000001")[2] - gt_box("ISIC_0000001")[0],
            gt_box("ISIC_0000001")[3] - gt_box("ISIC_0000001")[1],
        ],
        [700, 10, 90, 50],
    ]
    assert not [a for a in data["annotations"] if a["image_id"] == images["ISIC_0000004"]["id"]]

    gt = _coco_gt(data)
    stats = _evaluate(gt, data["annotations"])
    # every boxes[0] equals its mask box and outranks every miss: perfect AP at every IoU threshold
    assert stats[0] == pytest.approx(1.0) and stats[1] == pytest.approx(1.0) and stats[2] == pytest.approx(1.0)
    assert stats[8] == pytest.approx(1.0)  # AR@100

    # boxes shifted to IoU ~0.6 with the truth: a hit at IoU 0.5, a miss at 0.75
    moved = []
    for annotation in data["annotations"]:
        if annotation["score"] >= 0.6:
            x, y, w, h = annotation["bbox"]
            dx = w / 4.0  # IoU = (3/4) / (5/4) = 0.6
            moved.append({**annotation, "bbox": [x + dx, y, w, h]})
    stats = _evaluate(gt, moved)
    assert stats[1] == pytest.approx(1.0) and stats[2] == pytest.approx(0.0)


def test_coco_min_score_and_class_categories(cams_dir, tmp_path):
    pytest.importorskip("pycocotools")
    target = tmp_path / "classes.json"
    result = export(str(cams_dir), "coco", str(target), min_score=0.5, categories="classes")
    assert result.dropped_boxes == 3 and result.boxes == 4
    data = json.loads(target.read_text(encoding="utf-8"))
    assert [c["name"] for c in data["categories"]] == CLASSES and [c["id"] for c in data["categories"]] == [1, 2, 3]
    assert all(a["score"] >= 0.5 for a in data["annotations"])
    names = {c["id"]: c["name"] for c in data["categories"]}
    images = {i["id"]: i["camjobs_image_id"] for i in data["images"]}
    assert {images[a["image_id"]]: names[a["category_id"]] for a in data["annotations"]} == {
        "ISIC_0000001": "nevus",
        ODD_ID: "melanoma",
        "ISIC_0000003": "seborrheic_keratosis",
        "ISIC_0000002": "nevus",
    }
    # per-category evaluation against class-labelled ground truth still gives AP 1
    gt = _coco_gt(data)
    for annotation in gt.dataset["annotations"]:
        annotation["category_id"] = next(
            a["category_id"] for a in data["annotations"] if a["image_id"] == annotation["image_id"]
        )
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    assert _evaluate(gt, data["annotations"])[0] == pytest.approx(1.0)


def test_coco_image_ids_are_stable_across_exports(cams_dir, tmp_path):
    """Another output holding some of the same images, in another row order: each image keeps its
    id, so results from one export evaluate against the ground truth of the other."""
    pytest.importorskip("pycocotools")
    first = tmp_path / "first.json"
    export(str(cams_dir), "coco", str(first))
    data = json.loads(first.read_text(encoding="utf-8"))
    other = tmp_path / "other"
    table = pq.read_table(cams_dir / "cams" / OLD_RUN)
    rows = [row for row in table.to_pylist() if row["image_id"] != "ISIC_0000001"][::-1]
    _write_run(other, OLD_RUN, rows, None)
    second = tmp_path / "second.json"
    export(str(other), "coco", str(second))
    again = json.loads(second.read_text(encoding="utf-8"))
    ids = {image["camjobs_image_id"]: image["id"] for image in data["images"]}
    ids_again = {image["camjobs_image_id"]: image["id"] for image in again["images"]}
    assert len(ids_again) == 4 and all(ids[name] == number for name, number in ids_again.items())

    gt = _coco_gt(data)  # truth with the first export's ids, detections from the second
    detections = [a for a in again["annotations"] if a["score"] >= 0.6]
    with contextlib.redirect_stdout(io.StringIO()):
        from pycocotools.cocoeval import COCOeval

        evaluator = COCOeval(gt, load_coco_results(gt, detections), "bbox")
        evaluator.params.imgIds = sorted(ids[name] for name in ids_again if name != "ISIC_0000002")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)  # the same boxes on the same images


def test_coco_export_without_boxes_loads_and_evaluates(cams_dir, tmp_path):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    target = tmp_path / "none.json"
    result = export(str(cams_dir), "coco", str(target), min_score=1.1)
    assert result.boxes == 0 and result.dropped_boxes == 7 and result.images == 5
    with contextlib.redirect_stdout(io.StringIO()):
        empty = COCO(str(target))  # a valid dataset: its images and categories, no annotations
    assert len(empty.getImgIds()) == 5 and empty.getAnnIds() == [] and empty.getCatIds() == [1]

    gt = _coco_gt(json.loads(target.read_text(encoding="utf-8")))
    with contextlib.redirect_stdout(io.StringIO()):
        for results in (str(target), json.loads(target.read_text(encoding="utf-8")), []):
            dt = load_coco_results(gt, results)
            assert dt.getAnnIds() == [] and dt.getImgIds() == gt.getImgIds() and dt.getCatIds() == gt.getCatIds()
            evaluator = COCOeval(gt, dt, "bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            # every lesion missed: COCO's AP and AR are 0, not the -1 of "nothing to score"
            assert evaluator.stats[0] == 0.0 and evaluator.stats[8] == 0.0
        # and as ground truth: nothing to score, pycocotools' -1
        evaluator = COCOeval(empty, load_coco_results(empty, []), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] == -1.0
    # a non-empty list goes through loadRes as it is
    full = tmp_path / "full.json"
    export(str(cams_dir), "coco", str(full))
    with contextlib.redirect_stdout(io.StringIO()):
        assert len(load_coco_results(gt, str(full)).getAnnIds()) == 7


# --------------------------------------------------------------------------- Label Studio
def _check_labelstudio_task(task: dict, config_labels: set[str]) -> None:
    """Label Studio's documented import format for pre-annotated images (labelstud.io/guide/predictions)."""
    assert set(task) == {"id", "data", "predictions"}
    assert isinstance(task["data"]["image"], str) and task["data"]["image"]
    (prediction,) = task["predictions"]
    assert isinstance(prediction["model_version"], str) and prediction["model_version"]
    assert 0.0 <= prediction["score"] <= 1.0
    ids = [region["id"] for region in prediction["result"]]
    assert len(set(ids)) == len(ids)
    for region in prediction["result"]:
        assert region["type"] == "rectanglelabels" and region["from_name"] == "label" and region["to_name"] == "image"
        assert region["image_rotation"] == 0 and isinstance(region["original_width"], int)
        value = region["value"]
        assert set(value) == {"x", "y", "width", "height", "rotation", "rectanglelabels"}
        for key in ("x", "y", "width", "height"):
            assert 0.0 <= value[key] <= 100.0
        assert value["x"] + value["width"] <= 100.0 + 1e-9 and value["y"] + value["height"] <= 100.0 + 1e-9
        assert value["rotation"] == 0 and len(value["rectanglelabels"]) == 1
        assert set(value["rectanglelabels"]) <= config_labels
        assert 0.0 <= region["score"] <= 1.0


def _config_labels(xml_text: str) -> set[str]:
    view = ElementTree.fromstring(xml_text)
    assert view.tag == "View"
    image = view.find("Image")
    assert image.get("name") == "image" and image.get("value") == "$image"
    rectangles = view.find("RectangleLabels")
    assert rectangles.get("name") == "label" and rectangles.get("toName") == "image"
    return {label.get("value") for label in rectangles.findall("Label")}


@pytest.mark.parametrize("categories", ["lesion", "classes"])
def test_labelstudio_export_matches_documented_format(cams_dir, tmp_path, categories):
    target = tmp_path / "ls" / "tasks.json"
    result = export(
        str(cams_dir), "labelstudio", str(target), image_root="https://img.example.org/derm", categories=categories
    )
    config_path = tmp_path / "ls" / "tasks.label_config.xml"
    assert result.paths == [str(target), str(config_path)] and config_path.exists()
    labels = _config_labels(config_path.read_text(encoding="utf-8"))
    assert labels == ({"lesion"} if categories == "lesion" else set(CLASSES))
    tasks = json.loads(target.read_text(encoding="utf-8"))
    assert len(tasks) == 5 and [t["id"] for t in tasks] == [1, 2, 3, 4, 5]
    for task in tasks:
        _check_labelstudio_task(task, labels)
    by_id = {task["data"]["image_id"]: task for task in tasks}
    assert by_id[ODD_ID]["data"]["image"] == "https://img.example.org/derm/" + (
        "sub%20dir/%C3%9Cn%C3%AFc%C3%B6d%C3%A9%20%C3%A9t%C3%A9%20%3C1%3E%20%26%20%22q%22.jpg"
    )
    assert by_id["ISIC_0000002"]["predictions"][0]["model_version"] == "b" * 12
    assert by_id["ISIC_0000004"]["predictions"][0]["result"] == []
    # percent -> pixels, Label Studio's own conversion, gives back the exported boxes
    plan = {image.image_id: image for image in plan_export(str(cams_dir), categories=categories).images}
    for image_id, task in by_id.items():
        regions = task["predictions"][0]["result"]
        assert len(regions) == len(plan[image_id].boxes)
        for region, box in zip(regions, plan[image_id].boxes):
            value, w, h = region["value"], region["original_width"], region["original_height"]
            assert (w, h) == (plan[image_id].width, plan[image_id].height)
            assert value["x"] * w / 100 == pytest.approx(box.x_min, abs=1e-6)
            assert value["y"] * h / 100 == pytest.approx(box.y_min, abs=1e-6)
            assert (value["x"] + value["width"]) * w / 100 == pytest.approx(box.x_max, abs=1e-6)
            assert (value["y"] + value["height"]) * h / 100 == pytest.approx(box.y_max, abs=1e-6)
            assert region["score"] == pytest.approx(box.score)
            assert value["rectanglelabels"] == [box.category]


def test_labelstudio_without_image_root_names_the_source(cams_dir, tmp_path):
    target = tmp_path / "tasks"
    export(str(cams_dir), "labelstudio", str(target))
    assert (tmp_path / "tasks.label_config.xml").exists()
    tasks = json.loads(target.read_text(encoding="utf-8"))
    assert {t["data"]["image"] for t in tasks} >= {f"{DATA_ROOT}/{ODD_ID}.jpg", "/elsewhere/ISIC_0000002.jpg"}
    assert label_config_path("a/b.json") == "a/b.label_config.xml"


def test_label_config_escapes_label_values():
    xml_text = label_config(['a"b', "<c&d>"])
    assert _config_labels(xml_text) == {'a"b', "<c&d>"}


@pytest.mark.parametrize("output", ["cams_dir", "refined_dir"])
def test_labelstudio_sdk_validates_tasks(output, request, tmp_path):
    """Label Studio's own validator, where the SDK is installed (it pins opencv < 4.13, so it is
    not in the dev extra; run this test in an environment that has label-studio-sdk)."""
    interface_module = pytest.importorskip("label_studio_sdk.label_interface")
    target = tmp_path / "tasks.json"
    export(
        str(request.getfixturevalue(output)), "labelstudio", str(target), image_root="http://x/y", categories="classes"
    )
    interface = interface_module.LabelInterface((tmp_path / "tasks.label_config.xml").read_text(encoding="utf-8"))
    interface.validate()
    for task in json.loads(target.read_text(encoding="utf-8")):
        # validate_task with "predictions" calls validate_prediction() without its argument
        # (SDK 2.1.2), so the data and the prediction are checked separately.
        assert interface.validate_task({"data": task["data"]}) is True
        assert interface.validate_prediction(task["predictions"][0], return_errors=True) == []


# --------------------------------------------------------------------------- YOLO
# image_id -> (width, height, suffix, target, boxes): nested ids with one stem, a folder named
# "images" inside an id, a box on the image's edges, an image without boxes (left out)
YOLO_IMAGES = {
    "sub/dir/ISIC_1": (320, 240, ".jpg", "nevus", [((20, 30, 200, 180), 0.9), ((250, 10, 310, 60), 0.3)]),
    "other/ISIC_1": (300, 200, ".jpg", "melanoma", [((50, 40, 250, 190), 0.8)]),
    "ISIC_0000002": (256, 256, ".png", "nevus", [((0, 0, 256, 256), 0.7)]),
    ODD_ID: (200, 150, ".jpg", "seborrheic_keratosis", [((10, 20, 110, 120), 0.6)]),
    "images/ISIC_5": (240, 180, ".JPG", "nevus", [((30, 30, 90, 100), 0.5)]),
    "ISIC_0000004": (100, 100, ".jpg", "nevus", []),
}


def _draw_image(path: Path, width: int, height: int) -> None:
    """A real image file of that size (JPEG or PNG by the suffix)."""
    rng = np.random.default_rng(width * height)
    pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    ok, encoded = cv2.imencode(".png" if path.suffix.lower() == ".png" else ".jpg", pixels)
    assert ok
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded.tobytes())


@pytest.fixture()
def yolo_dir(tmp_path) -> Path:
    """An output whose source images exist under tmp_path/data, and a superseded row."""
    data, out = tmp_path / "data", tmp_path / "yolo-out"
    rows = []
    for image_id, (width, height, suffix, target, boxes) in YOLO_IMAGES.items():
        _draw_image(data / f"{image_id}{suffix}", width, height)
        boxes = [_box(xyxy, score) for xyxy, score in boxes]
        rows.append(_row(image_id, str(data / f"{image_id}{suffix}"), width, height, boxes, NEW_RUN, target=target))
    summary = {"config": {"data": str(data)}, "model": {"classes": CLASSES}}
    old = _row("other/ISIC_1", str(data / "other/ISIC_1.jpg"), 300, 200, [_box((0, 0, 9, 9), 0.99)], OLD_RUN)
    _write_run(out, OLD_RUN, [old], {"run_id": OLD_RUN, **summary})
    _write_run(out, NEW_RUN, rows, {"run_id": NEW_RUN, **summary})
    return out


def _in_val(image_id: str, fraction: float) -> bool:
    """The documented split: the first 64 bits of SHA-256(image_id) as a fraction of 2**64."""
    return int(hashlib.sha256(image_id.encode("utf-8")).hexdigest()[:16], 16) / 2**64 < fraction


def _boxed(output: Path, categories: str = "lesion", min_score: float = 0.0) -> dict:
    plan = plan_export(str(output), categories=categories, min_score=min_score)
    return {image.image_id: image for image in plan.images if image.boxes}


def _ultralytics(monkeypatch, tmp_path):
    """Ultralytics' dataset check and loader, kept off the network (there is none here)."""
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "ultralytics"))
    monkeypatch.setenv("YOLO_OFFLINE", "1")  # no online check at import
    utils = pytest.importorskip("ultralytics.data.utils", reason="ultralytics (the dev extra) reads YOLO datasets")
    from ultralytics.data import YOLODataset
    from ultralytics.utils import USER_CONFIG_DIR

    for font in ("Arial.ttf", "Arial.Unicode.ttf"):  # check_det_dataset downloads its plots' font where none is
        (USER_CONFIG_DIR / font).touch()
    return utils, YOLODataset


VAL_FRACTION = 0.5  # both sides non-empty on YOLO_IMAGES (asserted)


@pytest.mark.parametrize("images", ["link", "copy"])
def test_yolo_export_loads_in_ultralytics(yolo_dir, tmp_path, monkeypatch, images):
    utils, YOLODataset = _ultralytics(monkeypatch, tmp_path)
    target = tmp_path / "yolo"
    result = export(str(yolo_dir), "yolo", str(target), categories="classes", images=images, val_fraction=VAL_FRACTION)
    boxed = _boxed(yolo_dir, "classes")
    assert sorted(boxed) == sorted(i for i, spec in YOLO_IMAGES.items() if spec[4])
    expected = {image_id: "val" if _in_val(image_id, VAL_FRACTION) else "train" for image_id in boxed}
    assert set(expected.values()) == {"train", "val"}
    assert result.paths[0] == f"{target}/data.yaml" and "1 without a box left out" in result.message()

    data = utils.check_det_dataset(str(target / "data.yaml"))
    assert data["names"] == dict(enumerate(CLASSES)) and Path(data["path"]) == target
    found = {}
    for split in ("train", "val"):
        dataset = YOLODataset(img_path=data[split], data=data, task="detect", imgsz=64, augment=False)
        for index, label in enumerate(dataset.labels):
            relative = Path(label["im_file"]).relative_to(target / "images" / split)
            image_id, suffix = str(relative.with_suffix("")), relative.suffix
            found[image_id] = split
            image = boxed[image_id]
            assert suffix == YOLO_IMAGES[image_id][2]  # the image keeps its own name
            assert Path(label["im_file"]).is_symlink() == (images == "link")
            assert filecmp.cmp(label["im_file"], image.source_path, shallow=False)
            assert tuple(label["shape"]) == (image.height, image.width)
            assert dataset.load_image(index)[1] == (image.height, image.width)  # Ultralytics reads the pixels
            assert label["normalized"] and label["bbox_format"] == "xywh"
            assert [CLASSES[int(c)] for c in label["cls"].ravel()] == [box.category for box in image.boxes]
            for (cx, cy, w, h), box in zip(label["bboxes"], image.boxes):
                assert (cx - w / 2) * image.width == pytest.approx(box.x_min, abs=1e-3)
                assert (cy - h / 2) * image.height == pytest.approx(box.y_min, abs=1e-3)
                assert (cx + w / 2) * image.width == pytest.approx(box.x_max, abs=1e-3)
                assert (cy + h / 2) * image.height == pytest.approx(box.y_max, abs=1e-3)
    assert found == expected  # every image with a box, once, on its side; none without
    for image_id in ("sub/dir/ISIC_1", "other/ISIC_1"):  # one stem, two labels
        assert (target / "labels" / expected[image_id] / f"{image_id}.txt").is_file()


def test_yolo_label_files_are_where_ultralytics_looks(yolo_dir, tmp_path, monkeypatch):
    utils, _ = _ultralytics(monkeypatch, tmp_path)
    target = tmp_path / "yolo"
    export(str(yolo_dir), "yolo", str(target), val_fraction=0)
    images = sorted(p for p in (target / "images").rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    assert len(images) == len(_boxed(yolo_dir))
    labels = [Path(p) for p in utils.img2label_paths([str(p) for p in images])]
    assert all(p.is_file() for p in labels)
    written = sorted(p for p in target.rglob("*.txt"))
    assert written == sorted(labels)
    # an id with a folder named "images": Ultralytics replaces the last /images/ of the path
    assert target / "images/train/labels/ISIC_5.txt" in labels


def test_yolo_split_is_a_stable_hash_of_the_image_id(yolo_dir, tmp_path):
    target = tmp_path / "yolo"
    export(str(yolo_dir), "yolo", str(target), val_fraction=VAL_FRACTION, images="copy")
    with open(target / "manifest.csv", encoding="utf-8", newline="") as handle:
        manifest = {row["image_id"]: row for row in csv.DictReader(handle)}
    assert {i: row["split"] for i, row in manifest.items()} == {
        i: "val" if _in_val(i, VAL_FRACTION) else "train" for i in _boxed(yolo_dir)
    }
    assert manifest[ODD_ID]["file_name"] == f"{ODD_ID}.jpg" and manifest[ODD_ID]["boxes"] == "1"
    # fewer images (a higher --min-score): every image keeps its side
    subset = tmp_path / "subset"
    export(str(yolo_dir), "yolo", str(subset), val_fraction=VAL_FRACTION, min_score=0.55)
    with open(subset / "manifest.csv", encoding="utf-8", newline="") as handle:
        again = {row["image_id"]: row["split"] for row in csv.DictReader(handle)}
    assert set(again) == set(_boxed(yolo_dir, min_score=0.55)) and len(again) < len(manifest)
    assert all(manifest[i]["split"] == split for i, split in again.items())


def test_yolo_val_fraction_zero_makes_val_train(yolo_dir, tmp_path):
    import yaml

    target = tmp_path / "yolo"
    result = export(str(yolo_dir), "yolo", str(target), val_fraction=0)
    data = yaml.safe_load((target / "data.yaml").read_text(encoding="utf-8"))
    assert data == {"path": str(target), "train": "images/train", "val": "images/train", "names": {0: "lesion"}}
    assert not (target / "images" / "val").exists() and "val = train" in result.message()
    lines = {p: p.read_text(encoding="utf-8").splitlines() for p in target.rglob("*.txt")}
    assert len(lines) == 5 and all(line.startswith("0 ") for ls in lines.values() for line in ls)
    # one image cannot be split: whatever its hash, it is in train, and val is train
    one = tmp_path / "one"
    result = export(str(yolo_dir), "yolo", str(one), val_fraction=0.99, min_score=0.85)
    assert yaml.safe_load((one / "data.yaml").read_text(encoding="utf-8"))["val"] == "images/train"
    assert [str(p.relative_to(one)) for p in one.rglob("*.txt")] == ["labels/train/sub/dir/ISIC_1.txt"]


def test_yolo_reexport_replaces_its_own_folder_and_nothing_else(yolo_dir, tmp_path):
    target = tmp_path / "yolo"
    export(str(yolo_dir), "yolo", str(target), val_fraction=0)
    (target / "runs").mkdir()  # what a user keeps beside the dataset stays
    export(str(yolo_dir), "yolo", str(target), val_fraction=0, min_score=0.75)
    left = {str(p.relative_to(target / "labels" / "train")) for p in (target / "labels").rglob("*.txt")}
    assert left == {"sub/dir/ISIC_1.txt", "other/ISIC_1.txt"} and (target / "runs").is_dir()
    assert len([p for p in (target / "images").rglob("*") if p.is_symlink()]) == 2
    for image_id, (_, _, suffix, _, _) in YOLO_IMAGES.items():  # the links went, never their sources
        assert (tmp_path / "data" / f"{image_id}{suffix}").is_file()

    foreign = tmp_path / "foreign"
    (foreign / "labels").mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="--to .* not empty"):
        export(str(yolo_dir), "yolo", str(foreign))
    assert (foreign / "notes.txt").read_text() == "mine" and not (foreign / "data.yaml").exists()
    with pytest.raises(ExportError, match="is a file"):
        export(str(yolo_dir), "yolo", str(foreign / "notes.txt"))


def test_yolo_links_need_their_sources(yolo_dir, tmp_path):
    (tmp_path / "data" / "ISIC_0000002.png").unlink()
    with pytest.raises(FileNotFoundError, match="ISIC_0000002.png.*--images link"):
        export(str(yolo_dir), "yolo", str(tmp_path / "yolo"))
    assert not (tmp_path / "yolo").exists()  # refused before writing
    with pytest.raises(ExportError, match="--images"):
        export(str(yolo_dir), "yolo", str(tmp_path / "y"), images="hardlink")
    with pytest.raises(ExportError, match="--val-fraction"):
        export(str(yolo_dir), "yolo", str(tmp_path / "y"), val_fraction=1.0)


def test_yolo_refuses_ids_that_name_one_file(tmp_path):
    out = tmp_path / "out"
    rows = [_row(i, f"/d/{i}.jpg", 100, 100, [_box((1, 1, 50, 50), 0.9)], OLD_RUN) for i in ("a/b", "a\\b")]
    _write_run(out, OLD_RUN, rows, None)
    with pytest.raises(ExportError, match="same file images/train/a/b.jpg"):
        export(str(out), "yolo", str(tmp_path / "y"), images="copy", val_fraction=0)


def test_cli_yolo_options(yolo_dir, tmp_path):
    from typer.testing import CliRunner

    from camjobs.cli import app

    target = tmp_path / "yolo"
    args = ["export", "--output", str(yolo_dir), "--format", "yolo", "--to", str(target), "--images", "copy"]
    result = CliRunner().invoke(app, [*args, "--val-fraction", "0"])
    assert result.exit_code == 0, result.output
    assert "yolo: 6 images, 6 boxes" in result.output and "data.yaml" in result.output
    assert not [p for p in (target / "images").rglob("*") if p.is_symlink()]
    result = CliRunner().invoke(app, [*args, "--val-fraction", "1"])
    assert result.exit_code == 2 and "--val-fraction" in result.output


# --------------------------------------------------------------------------- refined masks (--boxes)
REFINE = "otsu"
BLOB_RUN = "20240303T000000Z-dddddd"


def _disc(width, height, centre, axes) -> np.ndarray:
    """One drawn blob: a filled ellipse."""
    return _mask(width, height, centre, axes)


def _pixel_box(mask: np.ndarray):
    """The blob's xyxy box (max exclusive), straight from its pixels."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _refined(row: dict, blobs: list[np.ndarray], scores: list[float]) -> dict:
    """The row as `camjobs run --refine` writes it: the blobs' union as COCO RLE, one box per blob."""
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(np.any(blobs, axis=0), dtype=np.uint8))
    row.update(
        mask_rle={"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
        refined_boxes=[_box(_pixel_box(blob), score) for blob, score in zip(blobs, scores)],
        refine=REFINE,
    )
    return row


# image_id -> (width, height, blobs largest first, their scores); the cam boxes are elsewhere
BLOBS = {
    "R_two": (400, 300, [_disc(400, 300, (150, 140), (90, 70)), _disc(400, 300, (340, 50), (20, 15))], [0.8, 0.3]),
    "R_one": (640, 480, [_disc(640, 480, (300, 260), (160, 120))], [0.7]),
}
CAM_BOXES = {
    "R_two": [_box((40, 40, 260, 230), 0.9)],
    "R_one": [_box((100, 100, 500, 400), 0.6)],
    "U_plain": [_box((10, 10, 60, 50), 0.5)],
    "N_nothing": [_box((5, 5, 30, 30), 0.4)],
}


def _blob_rows(run_id: str, root: Path) -> list[dict]:
    """Two refined rows, one of a run without --refine, one whose refinement found nothing; their
    images drawn under root."""
    rows = []
    for image_id, (width, height, blobs, scores) in BLOBS.items():
        rows.append(
            _refined(
                _row(image_id, f"{root}/{image_id}.jpg", width, height, CAM_BOXES[image_id], run_id), blobs, scores
            )
        )
    rows.append(_row("U_plain", f"{root}/U_plain.jpg", 200, 100, CAM_BOXES["U_plain"], run_id))
    rows.append(
        {**_row("N_nothing", f"{root}/N_nothing.jpg", 120, 90, CAM_BOXES["N_nothing"], run_id), "refine": REFINE}
    )
    for row in rows:
        if not Path(row["source_path"]).exists():
            _draw_image(Path(row["source_path"]), row["width"], row["height"])
    return rows


V1_SCHEMA = pa.schema(
    [f for f in CAMS_SCHEMA if f.name not in ("mask_rle", "refined_boxes", "refine", "probs")],
    metadata={"camjobs.schema_version": "1"},
)


def _write_v1(output: Path, rows: list[dict]) -> None:
    """The rows as version 1 wrote them: no mask_rle, refined_boxes, refine, probs; schema_version 1."""
    folder = output / "cams" / BLOB_RUN
    folder.mkdir(parents=True)
    rows = [{**{k: v for k, v in row.items() if k in V1_SCHEMA.names}, "schema_version": 1} for row in rows]
    pq.write_table(pa.Table.from_pylist(rows, schema=V1_SCHEMA), folder / "part-0.parquet")


@pytest.fixture()
def refined_dir(tmp_path) -> Path:
    out = tmp_path / "refined"
    data = tmp_path / "d"
    _write_run(out, BLOB_RUN, _blob_rows(BLOB_RUN, data), {"run_id": BLOB_RUN, "config": {"data": str(data)}})
    return out


def _coco_by_image(data: dict) -> dict[str, list[dict]]:
    names = {image["id"]: image["camjobs_image_id"] for image in data["images"]}
    found = {name: [] for name in names.values()}
    for annotation in data["annotations"]:
        found[names[annotation["image_id"]]].append(annotation)
    return found


def test_coco_segmentations_decode_to_the_drawn_masks(refined_dir, tmp_path):
    from pycocotools.coco import COCO

    target = tmp_path / "coco.json"
    result = export(str(refined_dir), "coco", str(target))  # --boxes auto
    assert result.refined_images == 2 and "refined boxes of 2 images, CAM boxes of 2" in result.message()
    with contextlib.redirect_stdout(io.StringIO()):
        dataset = COCO(str(target))
    by_image = _coco_by_image(json.loads(target.read_text(encoding="utf-8")))
    for image_id, (width, height, blobs, scores) in BLOBS.items():
        annotations = by_image[image_id]
        assert len(annotations) == len(blobs)
        for annotation, blob, score in zip(annotations, blobs, scores):
            x0, y0, x1, y1 = _pixel_box(blob)
            assert annotation["bbox"] == [x0, y0, x1 - x0, y1 - y0] and annotation["score"] == pytest.approx(score)
            assert annotation["iscrowd"] == 0 and annotation["area"] == np.count_nonzero(blob)
            assert annotation["segmentation"]["size"] == [height, width]
            assert isinstance(annotation["segmentation"]["counts"], str)
            assert np.array_equal(dataset.annToMask(dataset.anns[annotation["id"]]).astype(bool), blob)
    # without refinement (or with nothing refined) the CAM boxes go out as before, without a mask
    for image_id in ("U_plain", "N_nothing"):
        (annotation,) = by_image[image_id]
        assert "segmentation" not in annotation
        x, y, w, h = annotation["bbox"]
        assert [x, y, x + w, y + h] == [CAM_BOXES[image_id][0][k] for k in ("x_min", "y_min", "x_max", "y_max")]


def test_coco_refined_masks_load_as_results_and_evaluate(refined_dir, tmp_path):
    """The annotations as a loadRes result list: masks decode, and segm AP against the drawn masks is 1."""
    from pycocotools import mask as coco_mask
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    target = tmp_path / "coco.json"
    export(str(refined_dir), "coco", str(target), boxes="refined")
    data = json.loads(target.read_text(encoding="utf-8"))
    truth, names = [], {image["camjobs_image_id"]: image["id"] for image in data["images"]}
    for image_id, (_, _, blobs, _) in BLOBS.items():
        for blob in blobs:
            rle = coco_mask.encode(np.asfortranarray(blob, dtype=np.uint8))
            rle["counts"] = rle["counts"].decode("ascii")
            truth.append(
                {
                    "id": len(truth) + 1,
                    "image_id": names[image_id],
                    "category_id": 1,
                    "segmentation": rle,
                    "area": float(np.count_nonzero(blob)),
                    "bbox": list(coco_mask.toBbox(rle)),
                    "iscrowd": 0,
                }
            )
    gt = COCO()
    gt.dataset = {"images": data["images"], "annotations": truth, "categories": data["categories"]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        results = gt.loadRes(data["annotations"])
        evaluator = COCOeval(gt, results, "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)
    ids = {number: image_id for image_id, number in names.items()}
    for image_id, (_, _, blobs, _) in BLOBS.items():
        found = [a for a in results.dataset["annotations"] if ids[a["image_id"]] == image_id]
        assert [results.annToMask(a).astype(bool).tolist() for a in found] == [blob.tolist() for blob in blobs]


def test_boxes_refined_lists_unrefined_images_without_boxes(refined_dir, tmp_path):
    target = tmp_path / "coco.json"
    result = export(str(refined_dir), "coco", str(target), boxes="refined", min_score=0.5)
    assert (result.images, result.boxes, result.dropped_boxes, result.refined_images) == (4, 2, 1, 2)
    assert "2 without refinement exported with no box" in result.message()
    by_image = _coco_by_image(json.loads(target.read_text(encoding="utf-8")))
    assert by_image["U_plain"] == [] and by_image["N_nothing"] == []
    # the small blob (score 0.3) is dropped with its mask; the large one keeps only its own component
    (kept,) = by_image["R_two"]
    assert kept["area"] == np.count_nonzero(BLOBS["R_two"][2][0])
    with pytest.raises(ExportError, match="--boxes"):
        export(str(refined_dir), "coco", str(target), boxes="mask")


def test_boxes_cam_reproduces_the_output_without_refinement(refined_dir, tmp_path):
    """--boxes cam on refined rows writes what the same rows without refinement (version 1) give."""
    v1 = tmp_path / "v1"
    _write_v1(v1, _blob_rows(BLOB_RUN, tmp_path / "d"))
    (v1 / "runs").mkdir()
    summary = {"run_id": BLOB_RUN, "config": {"data": str(tmp_path / "d")}}
    (v1 / "runs" / f"{BLOB_RUN}.json").write_text(json.dumps(summary))
    assert pq.read_schema(next((v1 / "cams").rglob("*.parquet"))).names == V1_SCHEMA.names
    for fmt, name in (("coco", "x.json"), ("labelstudio", "x.json"), ("yolo", "x")):
        for categories in ("lesion", "classes"):
            runs = {
                "cam": export(str(refined_dir), fmt, str(tmp_path / "cam" / name), boxes="cam", categories=categories),
                "v1": export(str(v1), fmt, str(tmp_path / "v1out" / name), categories=categories),
            }
            assert runs["v1"].refined_images == 0 and runs["cam"].refined_images == 0
            assert [r.message().split(" -> ")[0] for r in runs.values()] == [runs["v1"].message().split(" -> ")[0]] * 2
            written = {key: _files(tmp_path / folder) for key, folder in (("cam", "cam"), ("v1", "v1out"))}
            assert written["cam"] == written["v1"] and written["v1"]
    refined = export(str(v1), "yolo", str(tmp_path / "none"), boxes="refined")
    assert refined.boxes == 0 and refined.refined_images == 0 and "4 without refinement" in refined.message()


def _files(folder: Path) -> dict[str, str]:
    """Every file under folder (an image: its hash), COCO's creation date and data.yaml's path left out."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix.lower() in (".jpg", ".png"):
            files[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
            continue
        text = path.read_text(encoding="utf-8")
        if path.name == "data.yaml":
            text = "\n".join(line for line in text.splitlines() if not line.startswith("path:"))
        if path.name.endswith(".json") and '"date_created"' in text:
            data = json.loads(text)
            data["info"].pop("date_created")
            text = json.dumps(data)
        files[str(path.relative_to(folder))] = text
    return files


def test_labelstudio_polygons_fill_back_to_the_masks(refined_dir, tmp_path):
    target = tmp_path / "tasks.json"
    export(str(refined_dir), "labelstudio", str(target), image_root="http://x/y", categories="classes")
    config = ElementTree.fromstring((tmp_path / "tasks.label_config.xml").read_text(encoding="utf-8"))
    polygons = config.find("PolygonLabels")
    assert polygons.get("name") == "polygon" and polygons.get("toName") == "image"
    assert {label.get("value") for label in polygons.findall("Label")} == _config_labels(
        (tmp_path / "tasks.label_config.xml").read_text(encoding="utf-8")
    )
    tasks = {task["data"]["image_id"]: task for task in json.loads(target.read_text(encoding="utf-8"))}
    for image_id, (width, height, blobs, scores) in BLOBS.items():
        regions = tasks[image_id]["predictions"][0]["result"]
        assert [r["type"] for r in regions] == ["rectanglelabels", "polygonlabels"] * len(blobs)
        assert len({r["id"] for r in regions}) == len(regions)
        for rectangle, polygon, blob, score in zip(regions[::2], regions[1::2], blobs, scores):
            assert polygon["from_name"] == "polygon" and polygon["to_name"] == "image"
            assert (polygon["original_width"], polygon["original_height"], polygon["image_rotation"]) == (
                width,
                height,
                0,
            )
            assert polygon["score"] == rectangle["score"] == pytest.approx(score)
            value = polygon["value"]
            assert set(value) == {"points", "closed", "polygonlabels"} and value["closed"] is True
            assert value["polygonlabels"] == rectangle["value"]["rectanglelabels"] == ["nevus"]
            points = np.array(value["points"])
            assert points.ndim == 2 and points.shape[1] == 2 and len(points) >= 3
            assert ((points >= 0) & (points <= 100)).all()
            pixels = np.round(points * [width / 100.0, height / 100.0] - 0.5).astype(np.int32)  # centres -> indices
            drawn = cv2.fillPoly(np.zeros((height, width), np.uint8), [pixels], 1).astype(bool)
            jaccard = np.count_nonzero(drawn & blob) / np.count_nonzero(drawn | blob)
            assert jaccard > 0.95, (image_id, jaccard)
    for image_id in ("U_plain", "N_nothing"):
        assert [r["type"] for r in tasks[image_id]["predictions"][0]["result"]] == ["rectanglelabels"]


def test_labelstudio_config_without_masks_has_no_polygons(refined_dir, tmp_path):
    export(str(refined_dir), "labelstudio", str(tmp_path / "t.json"), boxes="cam")
    assert "Polygon" not in (tmp_path / "t.label_config.xml").read_text(encoding="utf-8")
    assert label_config(["a"]) == label_config(["a"], polygons=False)
    assert _config_labels(label_config(["a", "b"], polygons=True)) == {"a", "b"}


def test_yolo_lines_are_the_refined_boxes(refined_dir, tmp_path):
    target = tmp_path / "yolo"
    result = export(str(refined_dir), "yolo", str(target), boxes="refined", val_fraction=0)
    assert sorted(p.stem for p in (target / "labels" / "train").glob("*.txt")) == sorted(BLOBS)
    assert result.boxes == 3
    for image_id, (width, height, blobs, _) in BLOBS.items():
        expected = []
        for blob in blobs:
            x0, y0, x1, y1 = _pixel_box(blob)
            expected.append(
                f"0 {(x0 + x1) / 2 / width:.8f} {(y0 + y1) / 2 / height:.8f} "
                f"{(x1 - x0) / width:.8f} {(y1 - y0) / height:.8f}"
            )
        assert (target / "labels" / "train" / f"{image_id}.txt").read_text(encoding="utf-8").splitlines() == expected


def test_split_mask_matches_each_refined_box_to_its_component():
    from camjobs.geometry import box_components

    mask = np.zeros((50, 80), bool)
    mask[5:20, 5:30] = True  # large
    mask[30:40, 50:60] = True  # small
    boxes = [_box((50, 30, 60, 40), 0.5), _box((5, 5, 30, 20), 0.9), _box((0, 40, 10, 50), 0.1)]
    small, large, none = box_components(mask, boxes)
    assert np.count_nonzero(small) == 100 and small[30:40, 50:60].all()
    assert np.count_nonzero(large) == 375 and large[5:20, 5:30].all()
    assert not none.any()  # a box that is no component's: the mask inside it (here nothing)
