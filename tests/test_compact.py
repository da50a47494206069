"""camjobs compact and the files a run writes: few large files, the same live rows, every reader working.

Outputs are written through camjobs.output's own publish path (real Parquet, real summaries); the
killed compactions are real processes killed with SIGKILL at a chosen step; one test runs real jobs
on the session's local Ray cluster.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from camjobs.compact import compact
from camjobs.labels.verify import verify_output
from camjobs.output import OutputDir, live_dataset, open_cams, publish_run, runs_to_replace, staging_dir
from camjobs.parquet_files import FileTarget, rewrite
from camjobs.schema import CAMS_SCHEMA, ERRORS_SCHEMA, SCHEMA_VERSION

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "model_sha256": "m1",
    "method": "cam",
    "threshold": 0.2,
    "target_mode": "predicted",
    "input_size": 64,
    "refine": None,
}


def _run_id(n: int) -> str:
    return f"2024{n // 28 % 12 + 1:02d}{n % 28 + 1:02d}T000000Z-{n:06x}"


def _cams(run_id: str, ids: list[str], settings: dict) -> pa.Table:
    rng = np.random.default_rng(abs(hash(run_id)) % 2**32)
    rows = [
        {
            "image_id": image_id,
            "content_sha256": f"{image_id}-sha",
            "width": 64,
            "height": 48,
            "cam": rng.random(4).astype(np.float32).tolist(),
            "heatmap_png": rng.bytes(int(rng.integers(10, 200))),
            "run_id": run_id,
            "schema_version": SCHEMA_VERSION,
            **settings,
        }
        for image_id in ids
    ]
    return pa.Table.from_pylist(rows, schema=CAMS_SCHEMA)


def _publish(output: Path, run_id: str, ids: list[str], errors: int = 1, parts: int = 3, **summary) -> None:
    """A run as the job publishes it: its rows staged in `parts` files, then publish_run."""
    settings = {**SETTINGS, **summary.pop("settings", {})}
    staged = Path(staging_dir(str(output), run_id))
    table = _cams(run_id, ids, settings)
    for name, rows in (("cams", table), ("errors", _errors(run_id, errors))):
        (staged / name).mkdir(parents=True, exist_ok=True)
        step = max(1, math.ceil(rows.num_rows / parts))
        for start in range(0, rows.num_rows, step):
            pq.write_table(rows.slice(start, step), staged / name / f"part-{start:05d}.parquet")
    counts = {"inputs": len(ids) + errors, "processed": len(ids), "errors": errors, "skipped": 0}
    base = {"run_id": run_id, "schema_version": SCHEMA_VERSION, "settings": settings, "counts": counts}
    publish_run(str(output), run_id, {**base, "write_mode": "incremental", **summary})


def _errors(run_id: str, n: int) -> pa.Table:
    rows = [
        {"image_id": f"bad-{run_id}-{i}", "error_type": "decode_error", "run_id": run_id, "schema_version": 3}
        for i in range(n)
    ]
    return pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA)


def _grown(output: Path, runs: int, per_run: int) -> list[str]:
    """An output after `runs` nightly runs of `per_run` new images each."""
    ids = []
    for n in range(runs):
        ids.append(_run_id(n))
        _publish(output, ids[-1], [f"img{n:04d}-{i:03d}" for i in range(per_run)])
    return ids


def _live(output: Path, name: str = "cams") -> pa.Table:
    """The live rows as readers see them, in a fixed order (the oracle compared column by column)."""
    table = live_dataset(OutputDir.open(str(output)), name).to_table()
    return table.sort_by([("run_id", "ascending"), ("image_id", "ascending")])


def _bare(output: Path, name: str = "cams") -> pa.Table:
    """Every row in the Parquet files, as a reader of the bare files (no camjobs) sees them."""
    files = sorted(str(p) for p in (output / name).rglob("*.parquet"))
    table = pa.concat_tables(pq.read_table(f, schema=CAMS_SCHEMA if name == "cams" else ERRORS_SCHEMA) for f in files)
    return table.sort_by([("run_id", "ascending"), ("image_id", "ascending")])


def _files(output: Path, name: str = "cams") -> list[Path]:
    return sorted((output / name).rglob("*.parquet"))


def test_rewrite_fills_files_to_the_target_and_keeps_every_row(tmp_path):
    table = _cams("r", [f"i{k:03d}" for k in range(100)], SETTINGS)
    fs = OutputDir.open(str(tmp_path)).fs
    written = rewrite(fs, table.to_batches(max_chunksize=9), CAMS_SCHEMA, f"{tmp_path}/a", FileTarget(rows=30))
    assert [rows for _, rows in written] == [30, 30, 30, 10]
    assert pq.read_table(tmp_path / "a").equals(table)
    by_bytes = rewrite(fs, table.to_batches(max_chunksize=5), CAMS_SCHEMA, f"{tmp_path}/b", FileTarget(bytes=3000))
    sizes = [os.path.getsize(path) for path, _ in by_bytes]
    assert len(by_bytes) > 1 and pq.read_table(tmp_path / "b").equals(table)
    assert all(size >= 3000 for size in sizes[:-1])  # a file closes once it holds the target
    empty = rewrite(fs, [], CAMS_SCHEMA, f"{tmp_path}/c")
    assert [rows for _, rows in empty] == [0] and pq.read_schema(empty[0][0]).equals(CAMS_SCHEMA)


def test_compact_leaves_few_files_the_same_live_rows_and_is_idempotent(tmp_path):
    output = tmp_path / "out"
    _grown(output, runs=40, per_run=30)
    before = {name: _live(output, name) for name in ("cams", "errors")}
    assert len(_files(output)) == 40 * 3

    result = compact(str(output))
    assert result.compaction_id is not None
    for name in ("cams", "errors"):
        after = _live(output, name)
        assert after.equals(before[name])  # every column of every row, run_id included
        assert _bare(output, name).equals(before[name])  # the replaced files are gone
        rows = before[name].num_rows
        assert len(_files(output, name)) <= max(1, rows // 10_000)
        assert result.counts[name] == {
            "files_before": 40 * (3 if name == "cams" else 1),
            "files_after": 1,
            "rows": rows,
            "rows_rewritten": rows,
            "rows_dropped": 0,
        }
    assert not (output / "_staging").exists() and not (output / "_lock.json").exists()
    report = verify_output(str(output))
    assert report.ok and report.runs == 40 and report.notes == [], (report.problems, report.notes)

    listing = _files(output) + _files(output, "errors")
    again = compact(str(output))
    assert again.compaction_id is None and _files(output) + _files(output, "errors") == listing
    assert _live(output).equals(before["cams"])


def test_only_small_files_are_rewritten(tmp_path):
    output = tmp_path / "out"
    _grown(output, runs=6, per_run=40)
    compact(str(output), target=FileTarget(rows=100))
    full = [p for p in _files(output) if pq.read_metadata(p).num_rows == 100]
    assert len(full) == 2  # 240 rows: two full files and one of 40
    _grown_more = _run_id(99)
    _publish(output, _grown_more, [f"late-{i}" for i in range(10)])
    before = _live(output)
    second = compact(str(output), target=FileTarget(rows=100))
    assert _live(output).equals(before)
    assert all(p in _files(output) for p in full)  # the full files stay as they are
    assert second.counts["cams"]["rows_rewritten"] == 50 and second.counts["cams"]["files_after"] == 3


def test_overwrite_after_compact_hides_the_compacted_rows_and_the_next_compact_drops_them(tmp_path):
    output = tmp_path / "out"
    old = _run_id(1)
    _publish(output, old, [f"a{i}" for i in range(20)])
    other = _run_id(2)
    _publish(output, other, [f"a{i}" for i in range(20)], settings={"threshold": 0.5})
    compact(str(output))
    assert runs_to_replace(str(output), SETTINGS, "overwrite") == (old,)
    new = _run_id(3)
    _publish(output, new, [f"a{i}" for i in range(20)], write_mode="overwrite", supersedes=[old])

    live = _live(output)
    assert set(live["run_id"].to_pylist()) == {other, new} and live.num_rows == 40
    assert set(open_cams(str(output)).to_table(columns=["run_id"])["run_id"].to_pylist()) == {other, new}
    assert verify_output(str(output)).ok

    result = compact(str(output))
    assert result.counts["cams"]["rows_dropped"] == 20 and result.counts["errors"]["rows_dropped"] == 1
    assert _live(output).equals(live) and _bare(output).equals(live)  # dropped from the files too
    assert verify_output(str(output)).ok


_KILLER = """
import os, signal, sys
from camjobs.compact import compact
def step(name):
    if name == sys.argv[2]:
        os.kill(os.getpid(), signal.SIGKILL)
compact(sys.argv[1], on_step=step)
"""


@pytest.mark.parametrize("step", ["planned", "staged", "publishing", "committed"])
def test_a_compaction_killed_midway_leaves_the_old_rows_and_the_next_one_finishes(tmp_path, step):
    output = tmp_path / "out"
    _grown(output, runs=5, per_run=12)
    before = {name: _live(output, name) for name in ("cams", "errors")}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", _KILLER, str(output), step], env=env, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    for name in ("cams", "errors"):
        assert _live(output, name).equals(before[name])  # before the commit the old rows, after it the new
    result = compact(str(output))  # takes the dead process's lock over and removes what it left
    for name in ("cams", "errors"):
        assert _live(output, name).equals(before[name]) and _bare(output, name).equals(before[name])
        assert len(_files(output, name)) == 1
    assert (result.compaction_id is None) == (step == "committed")
    assert not (output / "_staging").exists()
    report = verify_output(str(output))
    assert report.ok and report.notes == [], (report.problems, report.notes)


def test_a_failed_compaction_publishes_nothing(tmp_path):
    output = tmp_path / "out"
    _grown(output, runs=3, per_run=5)
    listing = _files(output) + _files(output, "errors")

    def fail(name):
        if name == "staged":
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        compact(str(output), on_step=fail)
    assert _files(output) + _files(output, "errors") == listing
    assert not (output / "_staging").exists() and not (output / "_lock.json").exists()
    assert not [p for p in (output / "runs").iterdir() if "compact" in p.name]


def test_readers_during_a_compaction_see_the_old_rows_or_the_new(tmp_path):
    output = tmp_path / "out"
    _grown(output, runs=150, per_run=8)
    expected = _live(output).select(["run_id", "image_id"])
    seen, missing, stop = [], [], threading.Event()

    def read_loop():
        while not stop.is_set():
            try:
                table = open_cams(str(output)).to_table(columns=["run_id", "image_id"])
            except FileNotFoundError:  # listed just before the replaced files were deleted (documented)
                missing.append(1)
                continue
            seen.append(table.sort_by([("run_id", "ascending"), ("image_id", "ascending")]))

    reader = threading.Thread(target=read_loop)
    reader.start()
    try:
        for _ in range(3):
            compact(str(output))
            _publish(output, _run_id(1000 + len(seen)), [])  # a small file for the next compaction
    finally:
        stop.set()
        reader.join()
    assert seen
    wrong = [t.num_rows for t in seen if not t.equals(expected)]
    assert wrong == [], f"{len(wrong)} of {len(seen)} reads saw other rows: {wrong[:5]} (expected {expected.num_rows})"


def _write_images(folder: Path, names: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / f"{name}.jpg", quality=90)


@pytest.mark.slow
def test_runs_write_few_files_and_incremental_after_compact_skips_the_same_images(ray_cluster, tmp_path):
    from camjobs.config import RunConfig
    from camjobs.pipeline.job import run_job

    data, output = tmp_path / "data", tmp_path / "out"
    base = dict(data=str(data), output=str(output), layout="folder", model="resnet18", classes=["a", "b"])
    config = RunConfig(**base, input_size=64, batch_size=4, incremental=True)
    _write_images(data, [f"img{i:02d}" for i in range(20)], seed=0)
    first = run_job(config)
    assert first.summary["counts"]["processed"] == 20
    assert len(_files(output)) == 1  # 20 rows from at least 5 write tasks, merged before publishing
    _write_images(data, [f"new{i:02d}" for i in range(6)], seed=1)
    assert run_job(config).summary["counts"]["processed"] == 6
    before = _live(output)
    compact(str(output))
    assert _live(output).equals(before) and len(_files(output)) == 1
    again = run_job(config)
    assert again.summary["counts"] == {**again.summary["counts"], "processed": 0, "errors": 0, "skipped": 26}
    assert verify_output(str(output)).ok


def test_the_compact_command_reports_its_counts_and_imports_neither_torch_nor_ray(tmp_path):
    output = tmp_path / "out"
    _grown(output, runs=4, per_run=5)
    before = _live(output)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def command(*args):
        return subprocess.run(
            [sys.executable, "-m", "camjobs", "compact", *args], env=env, capture_output=True, text=True, timeout=120
        )

    done = command("--output", str(output))
    assert done.returncode == 0, done.stderr
    assert "cams 12 -> 1 files" in done.stdout and "errors 4 -> 1 files" in done.stdout
    assert _live(output).equals(before)
    assert "nothing to do" in command("--output", str(output)).stdout
    missing = command("--output", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "no results" in missing.stderr
    imports = subprocess.run(
        [sys.executable, "-c", "import sys, camjobs.compact; print(sorted({'torch', 'ray'} & set(sys.modules)))"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert imports.stdout.strip() == "[]"
