"""Small truths: the README's schema table lists every column; a summary's paths are absolute where they
are local, URIs as given; the thresholded Jaccard says what its cut means; no plot curve hides another."""

from __future__ import annotations

import copy
import csv
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_evaluate import mask_cam_rows, write_output

from camjobs.config import RunConfig
from camjobs.labels import eval_plots
from camjobs.labels.evaluate import evaluate_output
from camjobs.schema import CAMS_SCHEMA

REPO = Path(__file__).resolve().parents[1]


def _readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n## {title}")
    return text[start : text.index("\n## ", start + 1)]


def test_the_readme_schema_table_lists_every_column():
    rows = [line for line in _readme_section("Output").splitlines() if line.startswith("| ")]
    documented = {name.strip() for row in rows for name in row.split("|")[1].split(",")}
    assert [name for name in CAMS_SCHEMA.names if name not in documented] == []
    assert "| target_mode | string |" in _readme_section("Output")


def test_a_summary_records_local_paths_absolute_and_uris_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = RunConfig(data="data", output="s3://key:secret@bucket/out?token=t", checkpoint="~/model.pt")
    recorded = cfg.resolved().redacted()
    assert recorded["data"] == str(tmp_path / "data")
    assert recorded["checkpoint"] == str(Path.home() / "model.pt")
    assert recorded["output"] == "s3://***@bucket/out?token=***"
    assert cfg.data == "data"  # the run itself keeps its config as given
    built = RunConfig(data="gs://bucket/isic", output="./out/", model="resnet18", weights="imagenet").resolved()
    assert (built.data, built.output, built.weights) == ("gs://bucket/isic", str(tmp_path / "out"), "imagenet")
    local = RunConfig(data="file:///data/isic", output="o", model="resnet18", classes=["a"], weights="w.pth")
    assert (local.resolved().data, local.resolved().weights) == ("file:///data/isic", str(tmp_path / "w.pth"))


@pytest.fixture(scope="module")
def real_report(isic2017_mini, tmp_path_factory) -> Path:
    """The report of six real ISIC 2017 images (maps made from their masks), with the Otsu baseline."""
    out = write_output(tmp_path_factory.mktemp("eval") / "out", mask_cam_rows(isic2017_mini))
    evaluate_output(str(out), data=str(isic2017_mini))
    return out / "eval"


def test_the_thresholded_jaccard_says_what_its_cut_means_and_applies_it(real_report):
    text = (real_report / "metrics.md").read_text()
    (row,) = [line for line in text.splitlines() if line.startswith("| ISIC 2018 thresholded Jaccard")]
    assert "Jaccard < 0.65 counts 0" in row
    assert re.search(r"where a\s+Jaccard below 0.65 counts as 0", text) and "failure" in text
    with (real_report / "per_image.csv").open() as file:
        per_image = list(csv.DictReader(file))
    for column, cell in (("jaccard", 1), ("otsu_jaccard", 3)):  # CAM, Otsu lesion mask
        jaccards = [float(r[column]) for r in per_image]
        expected = 100 * np.mean([j if j >= 0.65 else 0.0 for j in jaccards])
        assert row.split("|")[1 + cell].strip() == f"{expected:.2f}", column
    assert any(float(r["otsu_jaccard"]) >= 0.65 for r in per_image)  # the cut has something on each side
    assert any(float(r["jaccard"]) < 0.65 for r in per_image)


def _plot_area(image: np.ndarray) -> np.ndarray:
    """Inside the axes' frame, a few pixels in, left of where the maxima's circles sit at threshold 0."""
    top, bottom = eval_plots._TOP + 3, eval_plots._H - eval_plots._BOTTOM - 3
    left, right = eval_plots._LEFT + 12, eval_plots._W - eval_plots._RIGHT - 3
    return image[top:bottom, left:right]


def _pixels_of(image: np.ndarray, colour) -> int:
    return int(np.all(image == np.array(colour, np.uint8), axis=2).sum())


def _all_on_top_of_each_other(metrics: dict) -> dict:
    """The report's metrics with every source's curves exactly the CAM's: the worst case for hiding."""
    metrics = copy.deepcopy(metrics)
    metrics["refined"] = dict(metrics["otsu_baseline"])  # as if the run had --refine
    cam = metrics["details"]["pr_curves"]["cam"]
    metrics["details"]["pr_curves"] = {name: cam for name in ("cam", "refined", "otsu", "centre", "constant")}
    curves = metrics["details"]["box_acc_curves"]
    level = [50.0 if t < 0.5 else 0.0 for t in curves["thresholds"]]
    curves["all_contours"] = {iou: level for iou in ("0.3", "0.5", "0.7")}
    curves["largest_contour"] = {"0.5": level}
    for key in ("refined", "otsu_baseline", "centre_baseline", "constant_baseline"):
        metrics[key]["max_box_acc"] = 50.0
    return metrics


def test_every_curve_shows_its_own_colour_where_curves_lie_on_top_of_each_other(real_report):
    metrics = _all_on_top_of_each_other(json.loads((real_report / "metrics.json").read_text()))
    sources = ("cam", "refined", "otsu", "centre", "constant")
    colours = {name: eval_plots._COLOURS[name] for name in sources}
    pr = _plot_area(eval_plots.draw_pr_plot(metrics))
    assert {name: _pixels_of(pr, colour) >= 40 for name, colour in colours.items()} == dict.fromkeys(sources, True)

    box = _plot_area(eval_plots.draw_box_acc_plot(metrics))
    lines = {f"IoU {iou}": colour for iou, colour in eval_plots._IOU_COLOURS}
    lines["largest contour"] = eval_plots._BLACK
    lines.update({name: colours[name] for name in sources[1:]})  # the other sources' levels, at 50 too
    assert {name: _pixels_of(box, colour) >= 40 for name, colour in lines.items()} == dict.fromkeys(lines, True)
    assert len(set(lines.values())) == len(lines)  # one colour each


def test_the_real_plots_draw_every_source_with_a_legend(real_report):
    pr = cv2.imread(str(real_report / "pr_curve.png"))
    legend = pr[:, eval_plots._W - eval_plots._RIGHT :]
    for name in ("cam", "otsu", "centre", "constant"):  # refined: n/a without --refine, not drawn
        assert _pixels_of(_plot_area(pr), eval_plots._COLOURS[name]) >= 40, name
        assert _pixels_of(legend, eval_plots._COLOURS[name]) >= 10, name
    assert _pixels_of(legend, eval_plots._COLOURS["refined"]) == 0
