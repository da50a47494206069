"""camjobs.lock: the output's lock as a lease, in one process (test_faults holds it from other processes
and another host name)."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from camjobs.lock import OutputLocked, output_lock
from camjobs.output import LOCK_NAME, OutputDir, staging_dir
from camjobs.schema import CAMS_SCHEMA


def _row(image_id: str, run_id: str) -> dict:
    return {"image_id": image_id, "run_id": run_id, "width": 4, "height": 3, "schema_version": 2}


def test_lock_refuses_a_second_run_and_takes_over_a_dead_ones(tmp_path):
    with output_lock(str(tmp_path), "first"):
        with pytest.raises(OutputLocked, match="first"), output_lock(str(tmp_path), "second"):
            pass
        assert json.loads((tmp_path / LOCK_NAME).read_text())["run_id"] == "first"
    assert not (tmp_path / LOCK_NAME).exists()
    dead_pid = 2**22 + 12345  # above Linux's largest pid: no process has it
    (tmp_path / LOCK_NAME).write_text(json.dumps({"run_id": "dead", "host": socket.gethostname(), "pid": dead_pid}))
    (tmp_path / "_staging" / "dead" / "cams").mkdir(parents=True)
    with output_lock(str(tmp_path), "next"):
        assert not (tmp_path / "_staging" / "dead").exists()  # the dead run's staging is dropped
    assert OutputDir.open(str(tmp_path)).staged() == []


def _lock_record(output: Path) -> dict:
    return json.loads((output / LOCK_NAME).read_text())


def _ago(seconds: float) -> str:
    return (datetime.now(timezone.utc) - timedelta(seconds=seconds)).isoformat()


def test_the_lock_records_its_holder_and_lease_and_is_renewed_while_held(tmp_path):
    with output_lock(str(tmp_path), "r1", lease_s=0.3) as lease:
        first = _lock_record(tmp_path)
        assert (first["run_id"], first["host"], first["pid"]) == ("r1", socket.gethostname(), os.getpid())
        assert first["lease_s"] == 0.3
        time.sleep(0.5)  # past a third of the lease, at least once
        renewed = _lock_record(tmp_path)
        assert datetime.fromisoformat(renewed["renewed_at"]) > datetime.fromisoformat(first["renewed_at"])
        assert renewed["started_at"] == first["started_at"]
        lease.check()  # still ours
    assert not (tmp_path / LOCK_NAME).exists()


def test_an_expired_lease_is_taken_over_from_any_host_with_a_warning(tmp_path, caplog):
    stale = {"run_id": "gone", "host": "another-host", "pid": 4242, "lease_s": 5.0, "renewed_at": _ago(60)}
    (tmp_path / LOCK_NAME).write_text(json.dumps(stale))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="camjobs.output"), output_lock(str(tmp_path), "next"):
        assert _lock_record(tmp_path)["run_id"] == "next"
    assert time.monotonic() - started < 5  # expired by its renewal time: no waiting
    (warning,) = [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()]
    assert all(part in warning for part in ("gone", "another-host", "4242", "60 s ago", "lease of 5 s"))


def test_a_lock_of_an_older_camjobs_counts_from_its_start_with_the_default_lease(tmp_path, caplog):
    old = {"run_id": "old", "host": "another-host", "pid": 1, "started_at": _ago(2 * 3600)}
    (tmp_path / LOCK_NAME).write_text(json.dumps(old))
    with caplog.at_level(logging.WARNING, logger="camjobs.output"), output_lock(str(tmp_path), "next"):
        pass
    assert any("old" in r.getMessage() and "lease of 600 s" in r.getMessage() for r in caplog.records)


def test_a_fresh_lock_of_another_host_is_watched_until_its_lease_runs_out(tmp_path, caplog):
    unrenewed = {"run_id": "quiet", "host": "another-host", "pid": 7, "lease_s": 1.5, "renewed_at": _ago(0.5)}
    (tmp_path / LOCK_NAME).write_text(json.dumps(unrenewed))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="camjobs.output"), output_lock(str(tmp_path), "next"):
        waited = time.monotonic() - started
    assert 0.8 < waited < 5  # the rest of its lease (1.5 - 0.5 s), not at once and not forever
    assert any("quiet" in r.getMessage() and "whole lease" in r.getMessage() for r in caplog.records)


def test_a_holder_that_lost_its_lock_does_not_publish_and_leaves_the_new_lock(tmp_path):
    with output_lock(str(tmp_path), "slow", lease_s=0.3) as lease:
        thief = {"run_id": "thief", "host": "another-host", "pid": 9, "lease_s": 600.0, "renewed_at": _ago(0)}
        (tmp_path / LOCK_NAME).write_text(json.dumps(thief))
        time.sleep(0.4)  # the holder's next renewal finds the lock taken
        with pytest.raises(OutputLocked, match="lost the lock .* to run thief"):
            lease.check()
    assert _lock_record(tmp_path)["run_id"] == "thief"


def test_a_run_that_fails_under_the_lock_leaves_no_staging_and_no_lock(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), output_lock(str(tmp_path), "r1"):
        staged = Path(staging_dir(str(tmp_path), "r1")) / "cams"
        staged.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist([_row("a", "r1")], schema=CAMS_SCHEMA), staged / "part-0.parquet")
        raise RuntimeError("boom")
    assert OutputDir.open(str(tmp_path)).staged() == [] and not (tmp_path / LOCK_NAME).exists()
