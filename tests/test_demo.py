"""`camjobs demo` end to end, as a user runs it: a fresh process, its own local Ray cluster."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow


def test_demo_completes_and_beats_the_centre_box(tmp_path):
    output = tmp_path / "demo"
    completed = subprocess.run(
        [sys.executable, "-m", "camjobs", "demo", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    text = completed.stdout
    cam_iou = float(re.search(r"first CAM box with the mask box: ([0-9.]+)", text).group(1))
    centre_iou = float(re.search(r"centre-box baseline: +([0-9.]+)", text).group(1))
    assert cam_iou > centre_iou, text
    # the refined lesion masks' boxes beat the CAM's and the image-only Otsu baseline's
    refined_iou = float(re.search(r"first refined box \(--refine\): +([0-9.]+)", text).group(1))
    otsu_iou = float(re.search(r"Otsu lesion baseline: +([0-9.]+)", text).group(1))
    assert refined_iou > max(cam_iou, otsu_iou), text
    cams = pd.read_parquet(output / "results" / "cams")
    assert len(cams) == 240 and cams.image_id.is_unique
    assert re.search(r"240 rows, 0 errors", text)
    # The evaluation and the gallery it points at.
    metrics = json.loads((output / "results" / "eval" / "metrics.json").read_text())
    assert metrics["max_box_acc_v2"] > metrics["centre_baseline"]["max_box_acc_v2"], metrics
    assert abs(metrics["mean_iou"] / 100 - cam_iou) < 1e-3
    index = Path(re.search(r"gallery: (\S+)", text).group(1))
    assert index.exists() and len(list(index.parent.glob("*.png"))) == 48
