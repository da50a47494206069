"""camjobs verify: a clean output passes; planted damage is caught and the files are named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from camjobs.config import RunConfig
from camjobs.labels.verify import verify_output
from camjobs.pipeline.job import run_job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clean_output(ray_cluster, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("verify")
    data = base / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(data / f"i{i}.jpg")
    (data / "broken.jpg").write_bytes(b"nope")
    output = base / "out"
    run_job(
        RunConfig(
            data=str(data),
            output=str(output),
            layout="folder",
            model="resnet18",
            classes=["a", "b"],
            input_size=64,
            max_error_fraction=0.5,
        )
    )
    return output


def _copy(output: Path, tmp_path: Path) -> Path:
    target = tmp_path / "out"
    shutil.copytree(output, target)
    return target


def test_clean_output_passes(clean_output):
    report = verify_output(str(clean_output))
    assert report.ok, report.problems
    assert report.rows == {"cams": 5, "errors": 1} and report.runs == 1


def test_duplicated_file_is_caught(clean_output, tmp_path):
    output = _copy(clean_output, tmp_path)
    part = next((output / "cams").rglob("*.parquet"))
    shutil.copy(part, part.with_name("copied.parquet"))
    problems = verify_output(str(output)).problems
    assert any("appears twice" in p and "copied.parquet" in p for p in problems)
    assert any("processed = 5" in p and "10 rows" in p for p in problems)


def test_truncated_parquet_is_caught(clean_output, tmp_path):
    output = _copy(clean_output, tmp_path)
    part = next((output / "cams").rglob("*.parquet"))
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    problems = verify_output(str(output)).problems
    assert any(str(part) in p and "unreadable" in p for p in problems)


def test_rows_without_summary_are_caught(clean_output, tmp_path):
    output = _copy(clean_output, tmp_path)
    summary = next((output / "runs").glob("*.json"))
    summary.unlink()
    problems = verify_output(str(output)).problems
    assert any("without a run summary" in p and summary.stem in p for p in problems)


def test_verify_command_exit_codes(clean_output, tmp_path):
    from typer.testing import CliRunner

    from camjobs.cli import app

    runner = CliRunner()
    good = runner.invoke(app, ["verify", "--output", str(clean_output)])
    assert good.exit_code == 0 and "0 problems" in good.output
    output = _copy(clean_output, tmp_path)
    next((output / "runs").glob("*.json")).unlink()
    bad = runner.invoke(app, ["verify", "--output", str(output)])
    assert bad.exit_code == 1 and "without a run summary" in bad.output


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("version", [1, 2, 3])  # version 4 added the file fingerprint columns, null in these
def test_outputs_of_known_schema_versions_still_read(version, tmp_path):
    """Outputs written by earlier schema versions stay readable by this camjobs."""
    import pandas as pd

    from camjobs.output import done_rows

    output = FIXTURES / f"output-v{version}"
    report = verify_output(str(output))
    assert report.ok, report.problems
    cams = pd.read_parquet(output / "cams")
    assert set(cams.schema_version) == {version} and len(cams) == 3
    assert len(pd.read_parquet(output / "errors")) == 1
    summary = json.loads(next((output / "runs").glob("*.json")).read_text())
    assert summary["schema_version"] == version
    assert done_rows(str(output), summary["settings"]).num_rows == 3


def _repeat_run(output: Path, write_mode: str) -> str:
    """A second run holding the same rows as the first, written in `write_mode` (its summary says so)."""
    (first,) = [p.stem for p in (output / "runs").glob("*.json")]
    second = "29991231T235959Z-repeat"  # later than any real run id
    for name in ("cams", "errors"):
        (output / name / second).mkdir()
        for path in (output / name / first).glob("*.parquet"):  # each row names its run, as the job writes it
            table = pq.read_table(path)
            table = table.set_column(table.schema.get_field_index("run_id"), "run_id", pa.array([second] * len(table)))
            pq.write_table(table, output / name / second / path.name)
    summary = json.loads((output / "runs" / f"{first}.json").read_text())
    summary.update(run_id=second, write_mode=write_mode)
    (output / "runs" / f"{second}.json").write_text(json.dumps(summary))
    return second


def test_an_append_run_may_repeat_images_and_no_other_may(clean_output, tmp_path):
    appended = _copy(clean_output, tmp_path / "appended")
    _repeat_run(appended, "append")
    report = verify_output(str(appended))
    assert report.ok, report.problems
    assert report.rows == {"cams": 10, "errors": 2} and any("5 rows repeat" in note for note in report.notes)
    plain = _copy(clean_output, tmp_path / "plain")
    _repeat_run(plain, "error")
    assert sum("appears twice" in p for p in verify_output(str(plain)).problems) == 5


def test_superseded_and_unfinished_runs_are_not_read(clean_output, tmp_path):
    output = _copy(clean_output, tmp_path)
    (old,) = [p.stem for p in (output / "runs").glob("*.json")]
    new = _repeat_run(output, "overwrite")
    summary = json.loads((output / "runs" / f"{new}.json").read_text())
    # committed, but died before it deleted the rows it supersedes
    (output / "runs" / f"{new}.json").write_text(json.dumps({**summary, "supersedes": [old]}))
    report = verify_output(str(output))
    assert report.ok, report.problems
    assert report.rows == {"cams": 5, "errors": 1} and report.runs == 1
    assert any("superseded" in note and old in note for note in report.notes)
    # and a run that died publishing: its rows do not count either
    dying = "30000101T000000Z-dying"
    shutil.copytree(output / "cams" / new, output / "cams" / dying)
    (output / "runs" / f"{dying}.json").write_text(json.dumps({**summary, "run_id": dying, "status": "publishing"}))
    report = verify_output(str(output))
    assert report.ok and report.rows["cams"] == 5 and any(dying in note for note in report.notes)
