"""camjobs.output: the output folder's paths, publishing, lock, readers; and the sink's failure path.

Outputs are written here by hand in CAMS_SCHEMA (no Ray), except for the sink's test, which
writes through a real Ray Data pipeline on the session's local cluster.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from camjobs.output import (
    LOCK_NAME,
    NoResults,
    OutputDir,
    OutputExists,
    done_rows,
    drop_staging,
    newest_per_image,
    open_cams,
    publish_run,
    read_newest_cams,
    read_run_summaries,
    remove_unfinished,
    run_index,
    runs_to_replace,
    settings_filter,
    staging_dir,
)
from camjobs.schema import CAMS_SCHEMA, ERRORS_SCHEMA, RESULT_SCHEMA

OLD, NEW = "20240101T000000Z-aaaaaa", "20240202T000000Z-bbbbbb"
SETTINGS = {
    "model_sha256": "m1",
    "method": "cam",
    "threshold": 0.2,
    "target_mode": "predicted",
    "input_size": 64,
    "refine": None,
}


def _row(image_id: str, run_id: str, sha: str = "0" * 64, **settings) -> dict:
    return {
        "image_id": image_id,
        "content_sha256": sha,
        "width": 4,
        "height": 3,
        "run_id": run_id,
        "schema_version": 2,
        **{**SETTINGS, **settings},
    }


def _write(root: Path, rows: list[dict]) -> Path:
    for run_id in sorted({r["run_id"] for r in rows}):
        folder = root / "cams" / run_id
        folder.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist([r for r in rows if r["run_id"] == run_id], schema=CAMS_SCHEMA)
        pq.write_table(table, folder / "part-00000.parquet")
    return root


def test_paths_of_the_output_folder(tmp_path):
    out = OutputDir.open(f"{tmp_path}/")
    assert out.root == str(tmp_path)
    assert out.table("cams") == f"{tmp_path}/cams" and out.table("errors", "r1") == f"{tmp_path}/errors/r1"
    assert out.summary("r1") == f"{tmp_path}/runs/r1.json" and out.lock == f"{tmp_path}/{LOCK_NAME}"
    assert out.staging("r1") == f"{tmp_path}/_staging/r1" == staging_dir(str(tmp_path), "r1")
    assert staging_dir("s3://bucket/out/", "r1") == "s3://bucket/out/_staging/r1"  # a URI stays a URI


def test_newest_row_per_image_wins():
    table = pa.Table.from_pylist(
        [_row("b", OLD), _row("a", NEW), _row("b", NEW), _row("a", OLD), _row("c", OLD)], schema=CAMS_SCHEMA
    )
    newest = newest_per_image(table)
    assert list(zip(newest["image_id"].to_pylist(), newest["run_id"].to_pylist())) == [
        ("a", NEW),
        ("b", NEW),
        ("c", OLD),
    ]
    assert newest_per_image(table.slice(0, 0)).num_rows == 0


def test_cams_read_through_the_schema_and_newest_rows(tmp_path):
    with pytest.raises(NoResults, match="cams does not exist"):
        open_cams(str(tmp_path))
    _write(tmp_path, [_row("a", OLD), _row("b", OLD), _row("a", NEW)])
    # a version-1 file: without the columns added since, which read as nulls
    v1 = tmp_path / "cams" / "20230101T000000Z-v1"
    v1.mkdir()
    pq.write_table(
        pa.table({"image_id": ["z"], "run_id": ["20230101T000000Z-v1"], "schema_version": [1]}), v1 / "part-0.parquet"
    )
    assert open_cams(str(tmp_path)).schema == CAMS_SCHEMA
    table = read_newest_cams(str(tmp_path), ["refine"])
    assert table.column_names == ["image_id", "run_id", "refine"]
    assert table["run_id"].to_pylist() == [NEW, OLD, "20230101T000000Z-v1"] and table["refine"].null_count == 3


def _keys(output: Path, settings: dict) -> set[tuple[str, str]]:
    done = done_rows(str(output), settings)
    return set(zip(done["image_id"].to_pylist(), done["content_sha256"].to_pylist()))


def test_done_rows_match_every_setting_and_null_matches_null(tmp_path):
    assert _keys(tmp_path / "nothing-yet", SETTINGS) == set()
    _write(
        tmp_path,
        [_row("a", OLD, "1" * 64), _row("b", OLD, "2" * 64, refine="otsu"), _row("c", NEW, "3" * 64, threshold=0.5)],
    )
    assert _keys(tmp_path, SETTINGS) == {("a", "1" * 64)}
    assert _keys(tmp_path, {**SETTINGS, "refine": "otsu"}) == {("b", "2" * 64)}
    assert _keys(tmp_path, {**SETTINGS, "threshold": 0.5}) == {("c", "3" * 64)}
    old_summary = {k: v for k, v in SETTINGS.items() if k != "refine"}  # a version-1 run summary
    assert _keys(tmp_path, old_summary) == {("a", "1" * 64)}
    with pytest.raises(ValueError, match="exactly"):
        settings_filter({"method": "cam"})


def test_publish_moves_staging_into_place_and_writes_the_summary_last(tmp_path):
    staged = Path(staging_dir(str(tmp_path), "r1")) / "cams"
    staged.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([_row("a", "r1")], schema=CAMS_SCHEMA), staged / "part-0.parquet")
    path = publish_run(str(tmp_path), "r1", {"run_id": "r1", "counts": {"processed": 1}})
    assert path == str(tmp_path / "runs" / "r1.json") and json.loads(Path(path).read_text())["run_id"] == "r1"
    assert not (tmp_path / "_staging").exists()  # no empty _staging/ left behind
    assert pq.read_table(tmp_path / "cams" / "r1").num_rows == 1
    # a kind of row the run had none of: one empty file, so the table reads with its schema
    errors = pq.read_table(tmp_path / "errors" / "r1")
    assert errors.num_rows == 0 and errors.schema.equals(ERRORS_SCHEMA, check_metadata=False)
    summaries, missing = read_run_summaries(str(tmp_path))
    assert list(summaries) == ["r1"] and missing == {}


def test_run_summaries_say_which_runs_have_none(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "good.json").write_text(json.dumps({"run_id": "good"}))
    (tmp_path / "runs" / "bad.json").write_text("{not json")
    (tmp_path / "runs" / "_late.json.tmp").write_text("{}")  # a summary being written: not listed
    summaries, missing = read_run_summaries(str(tmp_path))
    assert list(summaries) == ["good"] and list(missing) == ["bad"]
    summaries, missing = read_run_summaries(str(tmp_path), ["good", "gone", "good"])
    assert list(summaries) == ["good"] and list(missing) == ["gone"]


def test_drop_staging_is_idempotent(tmp_path):
    (tmp_path / "_staging" / "r1" / "cams").mkdir(parents=True)
    (tmp_path / "_staging" / "r2").mkdir()
    drop_staging(str(tmp_path), "r1")
    drop_staging(str(tmp_path), "r1")
    assert [Path(p).name for p in OutputDir.open(str(tmp_path)).staged()] == ["r2"]  # another run's stays
    drop_staging(str(tmp_path), "r2")
    assert not (tmp_path / "_staging").exists()  # the last one takes the empty _staging/ with it


def test_publishing_keeps_staging_where_another_run_stages(tmp_path):
    for run_id in ("r1", "r2"):
        (tmp_path / "_staging" / run_id / "cams").mkdir(parents=True)
    publish_run(str(tmp_path), "r1", {"run_id": "r1"})
    assert [Path(p).name for p in OutputDir.open(str(tmp_path)).staged()] == ["r2"]


def _result_rows() -> pa.Table:
    """Result rows as the pipeline hands them to the sink: one image, one error."""
    rows = [
        {"image_id": "ok", "run_id": "r1", "width": 4, "height": 3, "skipped": False, "node_id": "n"},
        {
            "image_id": "bad",
            "run_id": "r1",
            "error_type": "decode_error",
            "error_message": "corrupt",
            "skipped": False,
            "node_id": "n",
        },
    ]
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


@pytest.mark.slow
def test_a_failed_write_leaves_no_staging(ray_cluster, tmp_path):
    from camjobs.pipeline.sink import CamParquetSink

    class Watched(CamParquetSink):
        """Notes what was staged when Ray reported the failure, before the sink drops it."""

        staged_at_failure: list[str] = []

        def on_write_failed(self, error: Exception) -> None:
            self.staged_at_failure = sorted(p.name for p in Path(self.staging).rglob("*.parquet"))
            super().on_write_failed(error)

    # Without error_message the error rows cannot be written: the task fails after writing the cams part.
    broken = _result_rows().drop_columns(["error_message"])
    sink = Watched(str(tmp_path), "r1")
    with pytest.raises(Exception, match="error_message"):
        ray_cluster.data.from_arrow(broken).write_datasink(sink)
    assert sink.staged_at_failure, "the task failed before it wrote anything: the test shows nothing"
    assert not (tmp_path / "_staging" / "r1").exists() and sink.stats is None

    # the same sink on good rows: staged, counted, and left for publishing
    good = CamParquetSink(str(tmp_path), "r2")
    ray_cluster.data.from_arrow(_result_rows()).write_datasink(good)
    assert (good.stats.processed, good.stats.errors) == (1, 1)
    assert {p.parent.name for p in (tmp_path / "_staging" / "r2").rglob("*.parquet")} == {"cams", "errors"}


# --------------------------------------------------------------------------- which runs are live
def _summary(root: Path, run_id: str, rows: int, **extra) -> None:
    (root / "runs").mkdir(exist_ok=True)
    summary = {"run_id": run_id, "schema_version": 2, "status": "completed", "settings": SETTINGS}
    summary.update(counts={"processed": rows, "errors": 0}, **extra)
    (root / "runs" / f"{run_id}.json").write_text(json.dumps(summary))


def _live_runs(root: Path) -> set[str]:
    return set(open_cams(str(root)).to_table(columns=["run_id"])["run_id"].to_pylist())


def test_an_overwrite_shows_its_rows_and_hides_the_old_ones_at_its_commit(tmp_path):
    _write(tmp_path, [_row("a", OLD), _row("b", OLD)])
    _summary(tmp_path, OLD, 2)
    # the overwrite run in the middle of publishing: rows in place, summary not yet committed
    _write(tmp_path, [_row("a", NEW, "1" * 64), _row("b", NEW, "1" * 64)])
    _summary(tmp_path, NEW, 2, status="publishing", write_mode="overwrite", supersedes=[OLD])
    assert _live_runs(tmp_path) == {OLD} and run_index(str(tmp_path)).hidden == {NEW}
    assert _keys(tmp_path, SETTINGS) == {("a", "0" * 64), ("b", "0" * 64)}
    # the commit: one rewrite of the summary
    _summary(tmp_path, NEW, 2, write_mode="overwrite", supersedes=[OLD])
    assert _live_runs(tmp_path) == {NEW} and run_index(str(tmp_path)).superseded == {OLD}
    assert read_newest_cams(str(tmp_path), [])["run_id"].to_pylist() == [NEW, NEW]
    assert _keys(tmp_path, SETTINGS) == {("a", "1" * 64), ("b", "1" * 64)}


def test_publish_deletes_what_it_supersedes_and_the_lock_removes_what_dead_runs_left(tmp_path):
    _write(tmp_path, [_row("a", OLD)])
    _summary(tmp_path, OLD, 1)
    staged = Path(staging_dir(str(tmp_path), NEW)) / "cams"
    staged.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([_row("a", NEW)], schema=CAMS_SCHEMA), staged / "part-0.parquet")
    path = publish_run(str(tmp_path), NEW, {"run_id": NEW, "status": "completed", "supersedes": [OLD]})
    assert json.loads(Path(path).read_text())["status"] == "completed"
    assert not (tmp_path / "cams" / OLD).exists() and (tmp_path / "runs" / f"{OLD}.json").exists()
    assert _live_runs(tmp_path) == {NEW}

    # what runs that died leave: one that died publishing, and superseded rows not yet deleted
    dead = "20240303T000000Z-cccccc"
    _write(tmp_path, [_row("b", dead), _row("a", OLD)])
    _summary(tmp_path, dead, 1, status="publishing")
    assert _live_runs(tmp_path) == {NEW}
    remove_unfinished(OutputDir.open(str(tmp_path)))
    assert sorted(p.name for p in (tmp_path / "cams").iterdir()) == [NEW]
    assert not (tmp_path / "runs" / f"{dead}.json").exists()


def test_runs_to_replace_by_write_mode(tmp_path):
    assert runs_to_replace(str(tmp_path / "new"), SETTINGS, "error") == ()
    _write(tmp_path, [_row("a", OLD), _row("b", NEW, threshold=0.5)])
    failed = "20240303T000000Z-cccccc"  # every input failed: no cams rows, but its summary has the settings
    _summary(tmp_path, failed, 0)
    with pytest.raises(OutputExists, match=f"{OLD}, {failed}.*--incremental.*--overwrite.*--append"):
        runs_to_replace(str(tmp_path), SETTINGS, "error")
    assert runs_to_replace(str(tmp_path), SETTINGS, "overwrite") == (OLD, failed)
    assert runs_to_replace(str(tmp_path), SETTINGS, "append") == runs_to_replace(str(tmp_path), SETTINGS, "incremental")
    assert runs_to_replace(str(tmp_path), SETTINGS, "append") == ()
    assert runs_to_replace(str(tmp_path), {**SETTINGS, "method": "gradcam"}, "error") == ()
