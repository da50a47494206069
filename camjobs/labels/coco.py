"""camjobs export --format coco: the COCO detection file (its format in camjobs.labels.export), and
its annotations loaded as pycocotools results, an empty list included."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from camjobs.geometry import xyxy_to_xywh
from camjobs.labels.export import LESION, ExportError, ExportPlan, image_url, stable_hash


def coco_image_id(image_id: str) -> int:
    """The image's COCO id, 1 .. 2**53 - 1: exact in readers that parse JSON numbers as doubles."""
    return stable_hash(image_id) % (2**53 - 1) + 1


def to_coco(plan: ExportPlan, *, image_root: str | None = None) -> dict:
    """A COCO detection dataset dict; its "annotations" list also works as a loadRes result list."""
    category_id = {name: i + 1 for i, name in enumerate(plan.categories)}
    images, annotations, taken = [], [], {}
    for image in plan.images:
        number = coco_image_id(image.image_id)
        if number in taken:  # 2**53 ids: never seen, but a shared id would merge two images' boxes
            raise ExportError(f"image ids {taken[number]!r} and {image.image_id!r} get the same COCO id {number}")
        taken[number] = image.image_id
        entry = {
            "id": number,
            "file_name": image.file_name,
            "width": image.width,
            "height": image.height,
            "camjobs_image_id": image.image_id,
        }
        if image_root:
            entry["coco_url"] = image_url(image_root, image.file_name)
        images.append(entry)
        for box in image.boxes:
            annotation = {
                "id": len(annotations) + 1,
                "image_id": number,
                "category_id": category_id[box.category],
                "bbox": list(xyxy_to_xywh(box.xyxy)),
                "area": box.area,
                "score": box.score,
                "iscrowd": 0,
            }
            if box.segmentation is not None:
                annotation["segmentation"] = box.segmentation
            annotations.append(annotation)
    return {
        "info": {
            "description": "camjobs weak lesion boxes (class activation maps)",
            "version": "1.0",
            "contributor": "camjobs",
            "date_created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": category_id[name], "name": name, "supercategory": LESION} for name in plan.categories],
    }


def load_coco_results(coco_gt, results):
    """pycocotools' ``coco_gt.loadRes(results)`` for a COCO export, its annotations or a results
    file, where an empty list gives a result set without detections (loadRes raises on one,
    cocoapi issue 450): its images and categories are the ground truth's, as loadRes copies them."""
    from pycocotools.coco import COCO

    if isinstance(results, str):
        with open(results, encoding="utf-8") as handle:
            results = json.load(handle)
    if isinstance(results, dict):
        results = results["annotations"]
    if results:
        return coco_gt.loadRes(results)
    empty = COCO()
    empty.dataset = {
        "info": dict(coco_gt.dataset.get("info", {})),
        "images": list(coco_gt.dataset["images"]),
        "categories": list(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    empty.createIndex()
    return empty
