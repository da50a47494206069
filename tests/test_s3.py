"""The whole cycle on an object store: list, read, write, publish, incremental, overwrite, export,
evaluate, verify and the lock, against an S3-compatible server (moto's) started on 127.0.0.1, through
pyarrow's own S3 client, with the credentials and the endpoint in the environment, as a user gives them."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest
from layout_fixtures import ISIC2017_CLASSES, FixtureInfo, make_folder, make_isic2017, write_image
from s3_server import ACCESS_KEY, S3Server, start_server

from camjobs import lock, storage
from camjobs.config import RunConfig, redact_text, redact_uri
from camjobs.lock import OutputLocked, output_lock, read_lock
from camjobs.output import open_cams
from camjobs.pipeline.job import RunResult, run_job
from camjobs.schema import CAMS_SCHEMA

pytest.importorskip("moto.server", reason="the S3 tests need moto's server (the dev extra)")
pytestmark = pytest.mark.slow

BUCKET = "camjobs-test"
DATA, OUT = f"s3://{BUCKET}/data", f"s3://{BUCKET}/out"
SECRET = "camjobs-s3-secret-" + uuid.uuid4().hex  # a string that can only come from the environment or a URI
INLINE = f"s3://{ACCESS_KEY}:{SECRET}@{BUCKET}/out"  # OUT with the credentials in the URI


@dataclass
class S3:
    server: S3Server
    fs: pafs.S3FileSystem  # configured by hand: reads back what camjobs wrote, independently of it
    data: FixtureInfo

    def keys(self, prefix: str) -> list[str]:
        """Every object below bucket/prefix, as paths relative to it."""
        infos = self.fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
        start = len(f"{BUCKET}/{prefix}/")
        return sorted(info.path[start:] for info in infos if info.type == pafs.FileType.File)

    def read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as stream:
            return stream.read()

    def cams(self, prefix: str = "out") -> list[dict]:
        """The rows of every Parquet file under prefix/cams, read with pyarrow.dataset."""
        dataset = pads.dataset(f"{BUCKET}/{prefix}/cams", filesystem=self.fs, format="parquet", schema=CAMS_SCHEMA)
        return dataset.to_table(columns=["image_id", "source_path", "content_sha256", "run_id", "boxes"]).to_pylist()

    def summary(self, run_id: str, prefix: str = "out") -> dict:
        return json.loads(self.read(f"{BUCKET}/{prefix}/runs/{run_id}.json"))


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The server, the environment a user sets for it, a bucket, and an ISIC 2017 dataset uploaded to DATA."""
    folder = tmp_path_factory.mktemp("s3")
    server = start_server(folder / "moto.log")
    environment = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_ENDPOINT_URL": server.endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
                patch.delenv(name, raising=False)
            for name, value in environment.items():
                patch.setenv(name, value)
            storage._bucket_filesystem.cache_clear()  # filesystems of another endpoint
            fs = server.filesystem(SECRET)
            fs.create_dir(BUCKET)
            info = make_isic2017(folder / "data", n=6)
            pafs.copy_files(str(info.root), f"{BUCKET}/data", pafs.LocalFileSystem(), fs)
            yield S3(server, fs, info)
            storage._bucket_filesystem.cache_clear()
    finally:
        server.stop()


def _config(**overrides) -> RunConfig:
    values = dict(
        data=DATA,
        output=OUT,
        layout="isic2017",
        model="resnet18",
        classes=list(ISIC2017_CLASSES),
        input_size=64,
        incremental=True,
    )
    return RunConfig(**{**values, **overrides})


@dataclass
class CliRun:
    returncode: int
    output: str  # stdout and stderr
    run_id: str


@pytest.fixture(scope="module")
def first_run(s3) -> CliRun:
    """`camjobs run` as a user starts it: a process of its own, its own local Ray cluster, which
    inherits the environment. Its --output carries the credentials inline (pyarrow accepts them):
    the output must show them nowhere."""
    command = [sys.executable, "-m", "camjobs", "run", "--data", DATA, "--output", INLINE, "--layout", "isic2017"]
    command += ["--model", "resnet18", "--classes", ",".join(ISIC2017_CLASSES), "--input-size", "64", "--incremental"]
    environment = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}  # a cluster of its own
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    runs = [key[: -len(".json")] for key in s3.keys("out/runs")]
    assert done.returncode == 0 and len(runs) == 1, done.stdout + done.stderr
    return CliRun(done.returncode, done.stdout + done.stderr, runs[0])


@pytest.fixture(scope="module")
def s3_ray(s3, first_run):
    """The tests' Ray cluster, its workers with the S3 environment (a cluster started before it lacks it)."""
    import ray

    @ray.remote
    def endpoint() -> str | None:
        return os.environ.get("AWS_ENDPOINT_URL")

    if ray.is_initialized() and ray.get(endpoint.remote()) != s3.server.endpoint:
        ray.shutdown()
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


@dataclass
class Watched:
    result: RunResult
    reads: list[str]  # the images the server sent during the run (one entry per GET), keys below DATA


def _watched(s3: S3, cfg: RunConfig) -> Watched:
    before = len(s3.server.gets(f"{BUCKET}/data/"))
    result = run_job(cfg)
    reads = s3.server.gets(f"{BUCKET}/data/")[before:]
    return Watched(result, sorted(key[len(f"{BUCKET}/data/") :] for key in reads if key.endswith(".jpg")))


def _key(s3: S3, image_id: str) -> str:
    """An image's key below DATA."""
    path = s3.data.paths[image_id]
    return f"{path.parent.name}/{path.name}"


@pytest.fixture(scope="module")
def incremental_reruns(s3, s3_ray, first_run, tmp_path_factory) -> list[Watched]:
    """Three --incremental runs: nothing new; then one image touched (its bytes written again) and
    one changed; then nothing new again."""
    unchanged = _watched(s3, _config())
    touched, changed = sorted(s3.data.paths)[:2]
    with s3.fs.open_output_stream(f"{BUCKET}/data/{_key(s3, touched)}") as stream:
        stream.write(s3.data.paths[touched].read_bytes())
    other = write_image(tmp_path_factory.mktemp("changed") / "changed.jpg", seed=99)
    with s3.fs.open_output_stream(f"{BUCKET}/data/{_key(s3, changed)}") as stream:
        stream.write(other.read_bytes())
    return [unchanged, _watched(s3, _config()), _watched(s3, _config())]


@dataclass
class Compacted:
    files_before: list[str]  # cams/ before it
    rows_before: list[tuple]  # every cams row before it: (image_id, content_sha256, run_id)
    output: str  # what `camjobs compact` said
    compaction_id: str
    rerun: Watched  # an --incremental run after it


def _row_keys(rows: list[dict]) -> list[tuple]:
    return sorted((row["image_id"], row["content_sha256"], row["run_id"]) for row in rows)


def _compact(s3: S3) -> tuple[str, str]:
    done = _cli("compact", "--output", OUT)
    assert done.exit_code == 0, done.output
    return done.output, re.search(r"compaction (\S+):", done.output).group(1)


@pytest.fixture(scope="module")
def compacted(s3, s3_ray, incremental_reruns) -> Compacted:
    """`camjobs compact` over the runs so far, then an --incremental run."""
    files, rows = s3.keys("out/cams"), _row_keys(s3.cams())
    output, compaction_id = _compact(s3)
    return Compacted(files, rows, output, compaction_id, _watched(s3, _config()))


@pytest.fixture(scope="module")
def overwrite_run(s3, s3_ray, compacted):
    return run_job(_config(incremental=False, overwrite=True))


def _counts(summary: dict) -> tuple[int, ...]:
    counts = summary["counts"]
    names = ("inputs", "processed", "skipped", "skipped_fingerprint", "skipped_hash", "errors")
    return tuple(counts[name] for name in names)


def _cli(*args: str):
    from typer.testing import CliRunner

    from camjobs.cli import app

    return CliRunner().invoke(app, list(args))


# --------------------------------------------------------------------------- the cycle
def test_a_run_reads_and_writes_s3_and_publishes_without_staging(s3, first_run):
    rows = s3.cams()
    expected = {image_id: path.read_bytes() for image_id, path in s3.data.paths.items()}
    assert sorted(row["image_id"] for row in rows) == sorted(expected)
    for row in rows:
        image = s3.data.paths[row["image_id"]]
        assert row["source_path"] == f"{DATA}/{image.parent.name}/{image.name}"
        assert row["content_sha256"] == hashlib.sha256(expected[row["image_id"]]).hexdigest()
        assert row["run_id"] == first_run.run_id
    summary = s3.summary(first_run.run_id)
    assert summary["status"] == "completed"
    assert _counts(summary) == (6, 6, 0, 0, 0, 0)
    assert summary["config"]["data"] == DATA and summary["config"]["output"] == f"s3://***@{BUCKET}/out"
    # Published file by file: no staging, no lock, every part in its run's folder, the summary beside them.
    keys = s3.keys("out")
    assert not [key for key in keys if key.startswith(("_staging", "_lock"))], keys
    assert {key.split("/")[0] for key in keys} == {"cams", "errors", "runs"}
    assert all(key.startswith((f"cams/{first_run.run_id}/", f"errors/{first_run.run_id}/", "runs/")) for key in keys)
    assert f"summary: s3://***@{BUCKET}/out/runs/{first_run.run_id}.json" in first_run.output
    verified = _cli("verify", "--output", OUT)
    assert verified.exit_code == 0, verified.output
    assert "1 runs, 6 cams rows, 0 error rows, 0 problems" in verified.output


def test_incremental_runs_on_s3_skip_unchanged_images_without_reading_them(s3, incremental_reruns, first_run):
    unchanged, after_change, settled = incremental_reruns
    touched, changed = sorted(s3.data.paths)[:2]
    # inputs, processed, skipped, of them skipped by fingerprint and by hash, errors
    assert _counts(unchanged.result.summary) == (6, 0, 6, 6, 0, 0)
    assert unchanged.reads == []  # the server's own log: not one image was read
    # Every image has the first run's row; only the changed one has a second, of the run that saw it change.
    runs = sorted((row["image_id"], row["run_id"]) for row in s3.cams())
    expected = [(image_id, first_run.run_id) for image_id in s3.data.paths]
    assert runs == sorted([*expected, (changed, after_change.result.run_id)])

    # A touched file is read once, hashed and skipped; a changed one is read and processed.
    assert _counts(after_change.result.summary) == (6, 1, 5, 4, 1, 0)
    assert after_change.reads == sorted([_key(s3, touched), _key(s3, changed)])
    rows = [row for row in s3.cams() if row["image_id"] == changed]
    assert sorted(row["content_sha256"] for row in rows) == sorted(
        hashlib.sha256(data).hexdigest()
        for data in (s3.data.paths[changed].read_bytes(), s3.read(f"{BUCKET}/data/{_key(s3, changed)}"))
    )
    # Both are known by their new fingerprints now: nothing is read again.
    assert _counts(settled.result.summary) == (6, 0, 6, 6, 0, 0)
    assert settled.reads == []
    for watched in incremental_reruns:
        assert watched.result.exit_code == 0 and s3.summary(watched.result.run_id)["status"] == "completed"
    verified = _cli("verify", "--output", OUT)
    assert verified.exit_code == 0, verified.output


def test_compact_on_s3_rewrites_cams_into_one_file_that_incremental_runs_still_skip_by(s3, compacted):
    assert len(compacted.files_before) >= 4, compacted.files_before  # a file per run, empty ones too
    assert [key.split("/")[0] for key in s3.keys("out/cams")] == sorted(  # one file more: the rerun's
        [compacted.compaction_id, compacted.rerun.result.run_id]
    )
    assert not [key for key in s3.keys("out") if key.startswith(("_staging", "_lock"))]
    # The same rows, each under its own run; read raw, so no file it replaced is left beside it.
    assert _row_keys(s3.cams()) == compacted.rows_before
    assert _counts(compacted.rerun.result.summary) == (6, 0, 6, 6, 0, 0)
    assert compacted.rerun.reads == []
    verified = _cli("verify", "--output", OUT)
    assert verified.exit_code == 0, verified.output


def test_overwrite_on_s3_replaces_the_rows_and_compact_drops_the_old_ones(
    s3, overwrite_run, first_run, incremental_reruns, compacted
):
    assert overwrite_run.exit_code == 0
    reruns = [watched.result.run_id for watched in incremental_reruns] + [compacted.rerun.result.run_id]
    assert overwrite_run.summary["supersedes"] == sorted([first_run.run_id, *reruns])
    live = open_cams(OUT).to_table(columns=["image_id", "run_id"]).to_pylist()
    assert sorted(row["image_id"] for row in live) == sorted(s3.data.paths)
    assert {row["run_id"] for row in live} == {overwrite_run.run_id}
    # The superseded runs' folders are gone but the compaction's, whose rows are hidden by their run_id.
    folders = {key.split("/")[1] for key in s3.keys("out") if key.startswith(("cams/", "errors/", "fingerprints/"))}
    assert folders == {overwrite_run.run_id, compacted.compaction_id}
    assert not [key for key in s3.keys("out") if key.startswith(("_staging", "_lock"))]
    assert overwrite_run.summary_path == f"{OUT}/runs/{overwrite_run.run_id}.json"
    verified = _cli("verify", "--output", OUT)
    assert verified.exit_code == 0, verified.output
    # A second compaction drops the hidden rows from disk: read raw, only the overwrite's rows are left.
    _, second = _compact(s3)
    assert {key.split("/")[0] for key in s3.keys("out/cams")} == {second}
    assert _row_keys(s3.cams()) == _row_keys(open_cams(OUT).to_table().to_pylist())
    assert {row["run_id"] for row in s3.cams()} == {overwrite_run.run_id}


def test_export_and_evaluate_read_from_s3_and_write_there(s3, overwrite_run):
    exported = _cli("export", "--output", OUT, "--format", "coco", "--to", f"s3://{BUCKET}/exports/coco.json")
    assert exported.exit_code == 0, exported.output
    coco = json.loads(s3.read(f"{BUCKET}/exports/coco.json"))
    ids = {image["id"]: image["camjobs_image_id"] for image in coco["images"]}
    assert sorted(ids.values()) == sorted(s3.data.paths)
    exported_boxes = sorted((ids[a["image_id"]], *map(float, a["bbox"])) for a in coco["annotations"])
    rows_boxes = sorted(
        (row["image_id"], *map(float, (b["x_min"], b["y_min"], b["x_max"] - b["x_min"], b["y_max"] - b["y_min"])))
        for row in s3.cams()
        for b in row["boxes"]
    )
    assert exported_boxes == rows_boxes and rows_boxes

    report = f"s3://{BUCKET}/eval"
    evaluated = _cli("evaluate", "--output", OUT, "--data", DATA, "--report", report)
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(s3.read(f"{BUCKET}/eval/metrics.json"))
    assert metrics["counts"]["images"] == len(s3.data.masks) == 6


def test_files_with_spaces_and_non_ascii_names_are_read_from_s3(s3, s3_ray, tmp_path):
    info = make_folder(tmp_path / "plain")
    pafs.copy_files(str(info.root), f"{BUCKET}/plain", pafs.LocalFileSystem(), s3.fs)
    output = f"s3://{BUCKET}/plain-out"
    result = run_job(_config(data=f"s3://{BUCKET}/plain", output=output, layout="folder", incremental=False))
    assert result.summary["counts"]["errors"] == 0, result.summary["error_types"]
    assert sorted(row["image_id"] for row in s3.cams("plain-out")) == info.image_ids
    assert "sub dir/Ünïcode name" in info.image_ids


def test_the_s3_endpoint_variable_wins_and_a_uri_may_name_its_own(s3, monkeypatch):
    """AWS_ENDPOINT_URL_S3 before AWS_ENDPOINT_URL, as in the AWS SDKs; an endpoint_override in the
    URI before both."""
    nowhere = "http://127.0.0.1:9"  # the discard port: nothing answers there
    reach = s3.server.endpoint.split("://", 1)[1]
    cases = [
        ({"AWS_ENDPOINT_URL": nowhere, "AWS_ENDPOINT_URL_S3": s3.server.endpoint}, f"s3://{BUCKET}/data"),
        ({"AWS_ENDPOINT_URL": nowhere}, f"s3://{BUCKET}/data?endpoint_override={reach}&scheme=http"),
    ]
    for environment, uri in cases:
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        storage._bucket_filesystem.cache_clear()
        fs, path = storage.open_filesystem(uri)
        assert path == f"{BUCKET}/data"
        image = "ISIC_0000002"  # never changed here
        assert fs.get_file_info(f"{path}/{_key(s3, image)}").size == s3.data.paths[image].stat().st_size
    monkeypatch.undo()
    storage._bucket_filesystem.cache_clear()


# --------------------------------------------------------------------------- credentials
def test_credentials_never_reach_logs_summaries_or_rows(s3, first_run, overwrite_run, caplog):
    assert SECRET not in first_run.output and ACCESS_KEY not in first_run.output  # --output carried both
    for key in s3.keys("out"):
        assert SECRET.encode() not in s3.read(f"{BUCKET}/out/{key}"), key
    shown = json.dumps(_config(output=INLINE, data=INLINE.replace("/out", "/data")).redacted())
    assert SECRET not in shown and ACCESS_KEY not in shown and f"***@{BUCKET}/out" in shown
    assert redact_uri(f"{INLINE}?secret_key={SECRET}") == f"s3://***@{BUCKET}/out?secret_key=***"
    with caplog.at_level(logging.DEBUG):
        verified = _cli("verify", "--output", INLINE)
    assert verified.exit_code == 0, verified.output
    assert SECRET not in verified.output + caplog.text
    # Errors name the URI as given, and pyarrow's own messages quote it: shown redacted.
    missing = INLINE.replace("/out", "/missing")
    refused = _cli("run", "--data", missing, "--output", INLINE, "--model", "resnet18", "--classes", "a,b")
    assert refused.exit_code == 2 and f"s3://***@{BUCKET}/missing" in refused.output, refused.output
    assert SECRET not in refused.output and ACCESS_KEY not in refused.output
    quoted = f"Cannot parse URI: '{INLINE}?secret_key={SECRET}&region=x' at character 7; gs://token@bucket/x"
    assert (
        redact_text(quoted)
        == f"Cannot parse URI: 's3://***@{BUCKET}/out?secret_key=***&region=x' at character 7; gs://***@bucket/x"
    )


# --------------------------------------------------------------------------- the lock
def test_a_second_run_on_a_locked_s3_output_is_refused(s3, s3_ray):
    output = f"s3://{BUCKET}/locked"
    with output_lock(output, "run-holding-the-lock"), pytest.raises(OutputLocked, match="run-holding-the-lock"):
        run_job(_config(output=output))
    assert s3.keys("locked") == []  # refused before it wrote anything; the holder released its lock


def test_a_stale_lock_on_s3_is_taken_over_and_what_its_run_left_removed(s3, caplog):
    output = f"s3://{BUCKET}/stale"
    long_ago = (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat()
    dead = {"run_id": "dead-run", "host": "another-host", "pid": 1, "lease_s": 60.0, "renewed_at": long_ago}
    left = {  # a run that died while it published: its lock, staged rows, rows moved in, its summary
        "_lock.json": json.dumps(dead),
        "_staging/dead-run/errors/part-0.parquet": "half written",
        "cams/dead-run/part-0.parquet": "moved in",
        "runs/dead-run.json": json.dumps({"run_id": "dead-run", "status": "publishing"}),
    }
    for key, text in left.items():
        with s3.fs.open_output_stream(f"{BUCKET}/stale/{key}") as stream:
            stream.write(text.encode())
    with caplog.at_level(logging.WARNING, logger="camjobs.lock"), output_lock(output, "taker") as lease:
        assert json.loads(s3.read(f"{BUCKET}/stale/_lock.json"))["run_id"] == "taker"
        lease.check()
        assert s3.keys("stale") == ["_lock.json"]  # the rest was removed under the new lock
    assert "taking over the lock of run dead-run (host another-host" in caplog.text
    assert s3.keys("stale") == []  # released


def test_of_two_runs_that_find_an_s3_lock_free_at_once_exactly_one_holds_it(s3, monkeypatch):
    """Both look before either writes (the barrier makes sure of it): an object store has no exclusive
    create, so only reading back after both wrote can tell them apart."""
    output, barrier, outcomes = f"s3://{BUCKET}/race", threading.Barrier(2), {}
    looked, real_read = threading.local(), read_lock

    def look_then_wait(out):
        holder = real_read(out)
        if holder is None and not getattr(looked, "done", False):
            looked.done = True
            barrier.wait(timeout=30)
        return holder

    monkeypatch.setattr(lock, "read_lock", look_then_wait)

    def run(name: str) -> None:
        try:
            with output_lock(output, name):
                outcomes[name] = "held"
                for _ in range(300):  # hold it until the other run has decided
                    if len(outcomes) == 2:
                        break
                    threading.Event().wait(0.1)
        except OutputLocked:
            outcomes[name] = "refused"

    threads = [threading.Thread(target=run, args=(f"racer-{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(outcomes.values()) == ["held", "refused"], outcomes
    assert s3.keys("race") == []


def test_a_run_whose_s3_lock_was_overwritten_publishes_nothing(s3):
    """A run paused past the settling time can still overwrite the winner's lock: the winner then finds
    it before it publishes, even when it never renewed."""
    output = f"s3://{BUCKET}/overwritten"
    with output_lock(output, "winner") as lease:
        lease.check()  # still the holder
        late = {"run_id": "late-run", "host": "another-host", "pid": 1, "lease_s": 600.0}
        with s3.fs.open_output_stream(f"{BUCKET}/overwritten/_lock.json") as stream:
            stream.write(json.dumps(late).encode())
        with pytest.raises(OutputLocked, match="lost the lock .* to run late-run"):
            lease.check()
    assert json.loads(s3.read(f"{BUCKET}/overwritten/_lock.json"))["run_id"] == "late-run"  # not the winner's to drop
