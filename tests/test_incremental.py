"""Write modes (incremental, overwrite, append, none) and the output lock, on a real local Ray cluster."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from camjobs.config import ConfigError, RunConfig, WriteMode
from camjobs.labels.verify import verify_output
from camjobs.lock import OutputLocked, output_lock
from camjobs.output import LOCK_NAME, done_rows, open_cams, settings_filter
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


def test_done_rows_filter_by_settings_and_carry_the_files_fingerprints(ray_cluster, tmp_path):
    data, output = tmp_path / "data", tmp_path / "out"
    _write_images(data, ["x", "y"])
    result = run_job(_config(data, output, incremental=False))
    settings = result.summary["settings"]
    done = done_rows(str(output), settings).sort_by("image_id")
    assert done["image_id"].to_pylist() == ["x", "y"]
    stats = [os.stat(data / f"{name}.jpg") for name in ("x", "y")]  # the oracle: the file system's own stat
    assert done["file_size"].to_pylist() == [s.st_size for s in stats]
    assert done["file_mtime_ns"].to_pylist() == [s.st_mtime_ns for s in stats]
    assert done["file_etag"].null_count == 2  # the local file system has none
    assert done["content_sha256"].to_pylist() == [
        hashlib.sha256((data / f"{name}.jpg").read_bytes()).hexdigest() for name in ("x", "y")
    ]
    assert done_rows(str(output), {**settings, "method": "gradcam"}).num_rows == 0
    assert done_rows(str(output), {**settings, "model_sha256": "0" * 64}).num_rows == 0
    assert done_rows(str(tmp_path / "nothing-yet"), settings).num_rows == 0


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


# --------------------------------------------------------------------------- write modes
def test_a_rerun_without_a_write_mode_is_refused_before_any_ray_work(ray_cluster, tmp_path):
    data, output = tmp_path / "data", tmp_path / "out"
    _write_images(data, ["a", "b", "c"])
    first = run_job(_config(data, output, incremental=False))
    before = sorted(str(p.relative_to(output)) for p in output.rglob("*"))
    command = [sys.executable, "-m", "camjobs", "run", "--data", str(data), "--output", str(output)]
    command += ["--layout", "folder", "--model", "resnet18", "--classes", "a,b", "--input-size", "64"]
    # No Ray listens there: a run that got as far as Ray would fail on it, with another exit code.
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}
    refused = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2, refused.stderr[-2000:]
    message = refused.stderr.strip().splitlines()[-1]
    assert message.startswith("camjobs: error:") and first.run_id in message
    assert all(flag in message for flag in ("--incremental", "--overwrite", "--append"))
    assert sorted(str(p.relative_to(output)) for p in output.rglob("*")) == before  # nothing written, no lock left


def test_write_modes_are_exclusive_and_a_flag_replaces_the_config_files(tmp_path):
    from typer.testing import CliRunner

    from camjobs.cli import app, load_run_config

    args = ["run", "--data", "d", "--output", "o", "--model", "resnet18", "--classes", "a,b"]
    both = CliRunner().invoke(app, [*args, "--overwrite", "--append"])
    assert both.exit_code == 2 and "--overwrite and --append" in both.output
    config = tmp_path / "job.yaml"
    config.write_text("data: d\noutput: o\nmodel: resnet18\nclasses: [a, b]\nincremental: true\n")
    assert load_run_config(config, {}).write_mode == WriteMode.INCREMENTAL
    assert load_run_config(config, {"overwrite": True}).write_mode == WriteMode.OVERWRITE
    with pytest.raises(ConfigError, match="--incremental and --append"):
        load_run_config(config, {"incremental": True, "append": True})


def test_overwrite_replaces_this_model_and_settings_rows_in_one_step(ray_cluster, tmp_path):
    data, output = tmp_path / "data", tmp_path / "out"
    _write_images(data, [f"img{i}" for i in range(6)])
    first = run_job(_config(data, output, incremental=False))
    other = run_job(_config(data, output, incremental=False, threshold=0.5))  # other settings: kept
    seen: list[Counter] = []  # the live rows of first's settings by run, as a reader saw them meanwhile
    stop = threading.Event()

    def read() -> None:
        condition = settings_filter(first.summary["settings"])
        while not stop.is_set():
            try:
                table = open_cams(str(output)).to_table(columns=["run_id"], filter=condition)
            except FileNotFoundError:
                continue  # listed before the commit, read after the old files went: read again
            seen.append(Counter(table["run_id"].to_pylist()))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        new = run_job(_config(data, output, incremental=False, overwrite=True))
    finally:
        stop.set()
        reader.join()
    assert new.summary["write_mode"] == "overwrite" and new.summary["supersedes"] == [first.run_id]
    assert len(seen) > 10 and seen[0] == Counter({first.run_id: 6})
    assert all(view in (Counter({first.run_id: 6}), Counter({new.run_id: 6})) for view in seen)  # never neither
    cams = pd.read_parquet(output / "cams")
    assert sorted(Counter(cams.run_id).items()) == sorted({new.run_id: 6, other.run_id: 6}.items())
    assert not (output / "cams" / first.run_id).exists() and (output / "runs" / f"{first.run_id}.json").exists()
    report = verify_output(str(output))
    assert report.ok and report.runs == 2, report.problems


def _as_dying_run(output: Path, source: str, dying: str) -> None:
    """A copy of run `source` as run `dying`, which died while it published (summary status publishing)."""
    folder = output / "cams" / dying
    folder.mkdir()
    table = pq.read_table(output / "cams" / source)
    table = table.set_column(table.schema.get_field_index("run_id"), "run_id", pa.array([dying] * table.num_rows))
    pq.write_table(table, folder / "part-0.parquet")
    summary = json.loads((output / "runs" / f"{source}.json").read_text())
    (output / "runs" / f"{dying}.json").write_text(json.dumps({**summary, "run_id": dying, "status": "publishing"}))


def test_verify_export_evaluate_and_viz_read_the_same_live_rows(ray_cluster, isic2017_mini, tmp_path):
    """Beside rows that no reader must see (of a run an --overwrite superseded, left by one that died
    between its commit and deleting them; of a newer run that died publishing), every tool reads the
    same live rows; an --append run of other settings is live too."""
    from camjobs.labels.evaluate import evaluate_output
    from camjobs.labels.export import export
    from camjobs.labels.viz import read_items

    output = tmp_path / "out"
    classes = ["melanoma", "nevus", "seborrheic_keratosis"]
    base = dict(data=isic2017_mini, output=output, layout="auto", classes=classes, incremental=False)
    first = run_job(_config(**base))
    shutil.copytree(output / "cams" / first.run_id, tmp_path / "kept")
    new = run_job(_config(**base, overwrite=True))
    shutil.copytree(tmp_path / "kept", output / "cams" / first.run_id)
    appended = run_job(_config(**base, append=True, threshold=0.5))
    assert appended.summary["write_mode"] == "append" and appended.summary["supersedes"] == []
    _as_dying_run(output, appended.run_id, "29991231T235959Z-dying")

    report = verify_output(str(output))
    assert report.ok and report.rows["cams"] == 12 and report.runs == 2, report.problems
    tasks = tmp_path / "tasks.json"
    export(str(output), "labelstudio", str(tasks))
    exported = {(t["data"]["image_id"], t["data"]["run_id"]) for t in json.loads(tasks.read_text())}
    viewed = {(item.image_id, item.run_id) for item in read_items(str(output))}
    assert exported == viewed and {run for _, run in exported} == {appended.run_id} and len(exported) == 6
    evaluated = evaluate_output(str(output), data=str(isic2017_mini), write=False)
    assert evaluated["settings"]["runs"] == [appended.run_id]  # the newest live run's settings
    assert (
        evaluate_output(str(output), data=str(isic2017_mini), run_id=new.run_id, write=False)["counts"]["images"] == 6
    )
    with pytest.raises(Exception, match="no rows of run"):
        evaluate_output(str(output), data=str(isic2017_mini), run_id=first.run_id, write=False)


# --------------------------------------------------------------------------- fingerprints
def _counts(result) -> tuple[int, int, int, int, int]:
    c = result.summary["counts"]
    assert c["inputs"] == c["processed"] + c["errors"] + c["skipped"]  # exactly once
    assert c["skipped"] == c["skipped_fingerprint"] + c["skipped_hash"]
    return c["processed"], c["errors"], c["skipped_fingerprint"], c["skipped_hash"], c["inputs"]


def _same_size_garbage(path: Path) -> None:
    """Other bytes of the same length, with the old mtime: only a reader of the file can tell."""
    stat = path.stat()
    path.write_bytes(b"\x00" * stat.st_size)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_fingerprint_skip_never_opens_the_file_and_a_touched_file_is_hashed_once(ray_cluster, tmp_path):
    data, output = tmp_path / "data", tmp_path / "out"
    _write_images(data, ["a", "b", "c", "d"])
    (data / "bad.jpg").write_bytes(b"not a jpeg")  # an error: tried again on every run, never skipped
    _write_images(data / "x", ["a"], seed=3)  # x/a: an id of its own (folder layout), no duplicate
    shutil.copy(data / "b.jpg", data / "b.png")  # b twice: b.png becomes b#2, a duplicate_id error
    first = run_job(_config(data, output))
    assert _counts(first) == (5, 2, 0, 0, 7)
    assert first.summary["error_types"] == {"decode_error": 1, "duplicate_id": 1}

    # a's bytes replaced, size and mtime kept: skipped by its fingerprint, so never read (or it would
    # be reprocessed, its hash being new, or fail to decode).
    _same_size_garbage(data / "a.jpg")
    # c touched: a new mtime, the same bytes: hashed once, found unchanged.
    stat = (data / "c.jpg").stat()
    os.utime(data / "c.jpg", ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    second = run_job(_config(data, output))
    assert _counts(second) == (0, 2, 4, 1, 7)
    touched = pq.read_table(output / "fingerprints" / second.run_id)
    assert touched.select(["image_id", "file_mtime_ns"]).to_pylist() == [
        {"image_id": "c", "file_mtime_ns": stat.st_mtime_ns + 5_000_000_000}
    ]
    assert touched["content_sha256"].to_pylist() == [hashlib.sha256((data / "c.jpg").read_bytes()).hexdigest()]

    # The next night: c skipped by its new fingerprint, hashed no more.
    third = run_job(_config(data, output))
    assert _counts(third) == (0, 2, 5, 0, 7)
    assert not (output / "fingerprints" / third.run_id).exists()

    # d's content changed (another size): processed again; --rehash reads every file that has a row, so
    # the garbage in a.jpg is found now and reprocessed (it fails to decode).
    _write_images(data, ["d"], seed=9)
    rehashed = run_job(_config(data, output, rehash=True))
    assert _counts(rehashed) == (1, 3, 0, 3, 7)
    assert rehashed.summary["error_types"] == {"decode_error": 2, "duplicate_id": 1}
    cams = pd.read_parquet(output / "cams")
    assert cams.groupby("image_id").content_sha256.nunique().to_dict() == {"a": 1, "b": 1, "c": 1, "d": 2, "x/a": 1}
    report = verify_output(str(output))
    assert report.ok, report.problems


def test_cams_rows_carry_the_listed_fingerprint(ray_cluster, tmp_path):
    data, output = tmp_path / "data", tmp_path / "out"
    _write_images(data, ["p", "q"])
    run_job(_config(data, output, incremental=False))
    cams = pq.read_table(output / "cams").sort_by("image_id")
    stats = [os.stat(data / f"{name}.jpg") for name in ("p", "q")]
    assert cams["file_size"].to_pylist() == [s.st_size for s in stats]
    assert cams["file_mtime_ns"].to_pylist() == [s.st_mtime_ns for s in stats]  # every digit: no float on the way
    assert cams["file_etag"].null_count == 2


def test_a_run_with_nothing_to_do_starts_no_ray(ray_cluster, tmp_path):
    data, output = tmp_path / "data", tmp_path / "out"
    _write_images(data, ["a", "b", "c"])
    first = run_job(_config(data, output))
    command = [sys.executable, "-m", "camjobs", "run", "--data", str(data), "--output", str(output), "--incremental"]
    command += ["--layout", "folder", "--model", "resnet18", "--classes", "a,b", "--input-size", "64"]
    # No Ray listens there: a run that started or joined Ray would fail on it.
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (summary_path,) = set((output / "runs").glob("*.json")) - {output / "runs" / f"{first.run_id}.json"}
    summary = json.loads(summary_path.read_text())
    assert summary["counts"] == {
        "inputs": 3,
        "processed": 0,
        "skipped": 3,
        "skipped_fingerprint": 3,
        "skipped_hash": 0,
        "errors": 0,
    }
    assert summary["actors"] is None and summary["status"] == "completed"
    assert verify_output(str(output)).ok
