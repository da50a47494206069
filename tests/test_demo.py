"""`camjobs demo` end to end, as a user runs it: a fresh process, its own local Ray cluster."""

from __future__ import annotations

import re
import subprocess
import sys

import pandas as pd
import pytest

pytestmark = pytest.mark.slow


def test_demo_completes_and_beats_the_centre_box(tmp_path):
    output = tmp_path / "demo"
    completed = subprocess.run(
        [sys.executable, "-m", "camjobs", "demo", "--output", str(output)],
        capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    text = completed.stdout
    cam_iou = float(re.search(r"first CAM box with the mask box: ([0-9.]+)", text).group(1))
    centre_iou = float(re.search(r"centre-box baseline: +([0-9.]+)", text).group(1))
    assert cam_iou > centre_iou, text
    cams = pd.read_parquet(output / "results" / "cams")
    assert len(cams) == 240 and cams.image_id.is_unique
    assert re.search(r"240 rows, 0 errors", text)
