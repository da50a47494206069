"""Incremental runs and the output lock, on a real local Ray cluster."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from camjobs.config import RunConfig
from camjobs.output import LOCK_NAME, OutputLocked, existing_keys, output_lock
from camjobs.pipeline.job import run_job

pytestmark = pytest.mark.slow


def _write_images(folder: Path, names: list[str], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / f"{name}.jpg", quality=90)


def _config(data: Path, output: Path, **overrides) -> RunConfig:
    values = dict(
        data=str(data),
        output=str(output),
        layout="folder",
        model="resnet18",
        classes=["a", "b"],
        input_size=64,
        incremental=True,
    )
    values.update(overrides)
    return RunConfig(**values)


def test_incremental_runs_process_only_new_or_changed_images(ray_cluster, tmp_path):
    data, output = tmp_path / "data", tmp_path / "out"
    _write_images(data, [f"img{i:02d}" for i in range(8)])
    counts = []
    first = run_job(_config(data, output))
    counts.append(first.summary["counts"])
    _write_images(data, [f"img{i:02d}" for i in range(8, 12)], seed=1)
    counts.append(run_job(_config(data, output)).summary["counts"])
    nothing_new = run_job(_config(data, output))
    counts.append(nothing_new.summary["counts"])
    assert [(c["processed"], c["skipped"]) for c in counts] == [(8, 0), (4, 8), (0, 12)]
    assert nothing_new.exit_code == 0
    cams = pd.read_parquet(output / "cams")
    assert len(cams) == 12 and cams.image_id.is_unique

    # Same name, new content: processed again; the old row stays for the old content.
    _write_images(data, ["img03"], seed=7)
    changed = run_job(_config(data, output))
    assert (changed.summary["counts"]["processed"], changed.summary["counts"]["skipped"]) == (1, 11)
    cams = pd.read_parquet(output / "cams")
    assert len(cams) == 13 and cams.groupby("image_id").content_sha256.nunique()["img03"] == 2

    # Other output-affecting settings are a different key: everything is processed again.
    other = run_job(_config(data, output, threshold=0.5))
    assert other.summary["counts"]["processed"] == 12


def test_existing_keys_filters_by_settings(ray_cluster, tmp_path):
    data, output = tmp_path / "data", tmp_path / "out"
    _write_images(data, ["x", "y"])
    result = run_job(_config(data, output, incremental=False))
    settings = result.summary["settings"]
    assert len(existing_keys(str(output), settings)) == 2
    assert existing_keys(str(output), {**settings, "method": "gradcam"}) == frozenset()
    assert existing_keys(str(output), {**settings, "model_sha256": "0" * 64}) == frozenset()
    assert existing_keys(str(tmp_path / "nothing-yet"), settings) == frozenset()


def test_second_concurrent_run_is_refused(ray_cluster, tmp_path):
    data, output = tmp_path / "data", tmp_path / "out"
    _write_images(data, ["a"])
    with output_lock(str(output), "run-holding-the-lock"), pytest.raises(OutputLocked, match="run-holding-the-lock"):
        run_job(_config(data, output))
    assert not (output / "cams").exists()  # the refused run wrote nothing
    assert not (output / LOCK_NAME).exists()  # released on exit
    assert run_job(_config(data, output)).summary["counts"]["processed"] == 1


def test_stale_lock_and_staging_of_a_dead_run_are_cleaned(ray_cluster, tmp_path):
    data, output = tmp_path / "data", tmp_path / "out"
    _write_images(data, ["a", "b"])
    output.mkdir()
    # A run that died: its lock names a pid that no longer exists, its staging is half written.
    dead_pid = 2**22 + 12345
    (output / LOCK_NAME).write_text(json.dumps({"run_id": "dead", "host": socket.gethostname(), "pid": dead_pid}))
    staged = output / "_staging" / "dead" / "cams"
    staged.mkdir(parents=True)
    shutil.copy(Path(__file__).parent / "fixtures" / "isic2017-mini" / "README.md", staged / "part-0.parquet")
    result = run_job(_config(data, output))
    assert result.summary["counts"]["processed"] == 2
    assert not (output / "_staging" / "dead").exists()
    assert len(pd.read_parquet(output / "cams")) == 2
