"""The report of ``camjobs evaluate``: metrics.json, metrics.md (a table per score source),
per_image.csv and the two plots (``camjobs.labels.eval_plots``), written to a local folder or a URI.

No torch, no Ray.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from typing import Any

from camjobs.labels.eval_plots import draw_box_acc_plot, draw_pr_plot, encode_png, fmt
from camjobs.labels.metrics import ISIC_JACCARD_CUTOFF
from camjobs.labels.scores import METRIC_KEYS, source_blocks
from camjobs.storage import open_filesystem

METRIC_NAMES = {
    "max_box_acc": "MaxBoxAcc (IoU 0.5, largest contour)",
    "max_box_acc_v2": "MaxBoxAccV2 (IoU 0.3/0.5/0.7, all contours)",
    "pxap": "PxAP (pixel average precision)",
    "top1_loc": "Top-1 Loc (IoU 0.5, at MaxBoxAcc's threshold)",
    "gt_known_loc": "GT-known Loc (IoU 0.5, at MaxBoxAcc's threshold)",
    "mean_iou": "mean IoU of boxes[0] (x100, run threshold)",
    "iou50_share": "share with IoU >= 0.5 of boxes[0] (run threshold)",
    "jaccard_mean": "mean Jaccard (run threshold)",
    "jaccard_isic2018": f"ISIC 2018 thresholded Jaccard: Jaccard < {ISIC_JACCARD_CUTOFF:g} counts 0 (run threshold)",
}


@dataclass
class EvaluationReport:
    metrics: dict[str, Any]  # the content of metrics.json
    report_dir: str | None = None  # where the files were written (None: not written)
    files: dict[str, str] = field(default_factory=dict)  # file name -> path

    def __getitem__(self, key: str) -> Any:
        return self.metrics[key]

    def table(self) -> str:
        return markdown_table(self.metrics)


def markdown_table(metrics: dict[str, Any]) -> str:
    """metric | CAM | each other source, in percent (n/a where a metric does not apply)."""
    blocks = source_blocks(metrics)
    lines = ["| metric | " + " | ".join(title for _, title, _ in blocks) + " |", "| --- |" + " ---: |" * len(blocks)]
    for key in METRIC_KEYS:
        lines.append(f"| {METRIC_NAMES[key]} | " + " | ".join(fmt(block[key]) for _, _, block in blocks) + " |")
    return "\n".join(lines)


def _image_baseline_note(counts: dict[str, Any], settings: dict[str, Any]) -> str:
    if not settings.get("image_baselines", True):
        return "off (--no-image-baselines): no image was read"
    unread = counts.get("image_unreadable", 0) + counts.get("image_size_changed", 0)
    return f"over the {counts.get('otsu_images', 0)} images read ({unread} unreadable or changed, left out)"


def markdown_report(metrics: dict[str, Any]) -> str:
    details, counts, settings = metrics["details"], metrics["counts"], metrics["settings"]
    by_iou = ", ".join(f"IoU {k}: {v:.2f}" for k, v in details["box_acc_v2_by_iou"].items())
    run_thresholds = ", ".join(f"{t:g}" for t in settings["run_thresholds"])
    lines = [
        "# Localization of the class activation maps",
        "",
        f"Output `{settings.get('output', '')}`, run(s) {', '.join(settings.get('runs', [])) or 'n/a'}; "
        f"ground truth: {settings.get('ground_truth', 'n/a')}.",
        f"{counts['evaluated']} images evaluated ({counts['with_mask']} with masks).",
        "",
        markdown_table(metrics),
        "",
        "All numbers are percentages. mean IoU is 100 x the mean IoU.",
        "",
        f"- MaxBoxAcc's best CAM threshold: {details['best_threshold']:.2f}; GT-known and top-1 Loc use it.",
        f"- MaxBoxAccV2 by IoU: {by_iou}.",
        f"- Run threshold(s) for the CAM's boxes[0] and Jaccard region: {run_thresholds}.",
        "- Sweep: CAM thresholds 0, 0.01, ..., 0.99 on the min-max normalized map (Choe et al., CVPR 2020).",
        "- The other sources have nothing to sweep: their boxes count at every threshold, their binary map "
        "for PxAP and the Jaccard.",
        f"- refined: refined_boxes and the mask_rle mask of a --refine run ({counts.get('refined_images', 0)} images; "
        "n/a without --refine).",
        f"- Otsu lesion mask: the image-only baseline (camjobs.segment.otsu_lesion_mask), "
        f"{_image_baseline_note(counts, settings)}.",
        "- centre box: the middle half of each side.",
        "- constant map: the whole image as the box at every threshold; every pixel positive for PxAP.",
        "- top-1 Loc counts labelled images; GT-known Loc the images whose map explains the ground-truth class.",
        f"- ISIC 2018 thresholded Jaccard: the mean over images of each image's Jaccard with its mask, where a "
        f"Jaccard below {ISIC_JACCARD_CUTOFF:g} counts as 0. ISIC 2018 Task 1 scored lesion segmentation so: a "
        "mask that far from the expert's is a failure someone must redraw, not a near miss; the cut allows for "
        "how much experts' own masks of a lesion differ (Codella et al. 2019).",
        "",
        "Counts: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ".",
        "",
        "Plots: `pr_curve.png` (pixel precision-recall), `box_acc.png` (BoxAcc against the CAM threshold).",
        "",
    ]
    return "\n".join(lines)


def write_report(metrics: dict[str, Any], per_image: list[dict[str, Any]], report_dir: str) -> dict[str, str]:
    """Write metrics.json, metrics.md, per_image.csv and the two PNG plots; name -> path."""
    fs, root = open_filesystem(report_dir.rstrip("/") or "/")
    fs.create_dir(root, recursive=True)
    text = io.StringIO()
    if per_image:
        writer = csv.DictWriter(text, fieldnames=list(per_image[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(per_image)
    contents = {
        "metrics.json": json.dumps(metrics, indent=2, allow_nan=False).encode(),
        "metrics.md": markdown_report(metrics).encode(),
        "per_image.csv": text.getvalue().encode(),
        "pr_curve.png": encode_png(draw_pr_plot(metrics)),
        "box_acc.png": encode_png(draw_box_acc_plot(metrics)),
    }
    files = {}
    for name, payload in contents.items():
        path = f"{root.rstrip('/')}/{name}"
        with fs.open_output_stream(path) as stream:
            stream.write(payload)
        files[name] = path if "://" not in report_dir else f"{report_dir.rstrip('/')}/{name}"
    return files
