"""Two simulated GPU nodes both run model actors, and the summary says how many rows each did."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from layout_fixtures import noise_jpegs

pytestmark = pytest.mark.slow


def _run_on_simulated_cluster(tmp_path: Path, *flags: str) -> tuple[dict, Path, str]:
    """96 small images through multinode_run.py: its summary, the output folder, its stderr."""
    data = noise_jpegs(tmp_path / "data", 96, size=(48, 64))
    output = tmp_path / "out"
    script = Path(__file__).with_name("multinode_run.py")
    completed = subprocess.run(
        [sys.executable, str(script), str(data), str(output), *flags], capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    # Ray's own processes may print to the driver's stdout too (a lost node's retries): take the summary line.
    summary_line = next(line for line in reversed(completed.stdout.splitlines()) if line.startswith("{"))
    return json.loads(summary_line), output, completed.stderr


def test_two_simulated_gpu_nodes_both_process_rows(tmp_path):
    summary, output, _ = _run_on_simulated_cluster(tmp_path)
    # One actor per logical GPU by default, each on its own worker node.
    assert summary["actors"]["actors"] == 2 and summary["actors"]["num_gpus"] == 1.0
    rows_per_node = summary["rows_per_node"]
    assert set(rows_per_node) == set(summary["worker_node_ids"])
    assert all(count > 0 for count in rows_per_node.values()) and sum(rows_per_node.values()) == 96
    assert len(pd.read_parquet(output / "cams")) == 96


def test_worker_node_removed_mid_run_still_completes(tmp_path):
    summary, output, stderr = _run_on_simulated_cluster(tmp_path, "--remove-node")
    assert "removed a worker node" in stderr
    assert summary["counts"] == {
        "inputs": 96,
        "processed": 96,
        "skipped": 0,
        "skipped_fingerprint": 0,
        "skipped_hash": 0,
        "errors": 0,
    }
    cams = pd.read_parquet(output / "cams")
    assert len(cams) == 96 and cams.image_id.is_unique
