"""benchmarks/nightly.py at 300 images, 10 new: its figures against what the archive, the output and
the run summary say when read independently."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
IMAGES, NEW = 300, 10

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def nightly(tmp_path_factory) -> tuple[dict, str, Path]:
    work = tmp_path_factory.mktemp("nightly")
    command = [sys.executable, "-m", "benchmarks.nightly", "--images", str(IMAGES), "--new", str(NEW)]
    command += ["--listing", str(IMAGES), "--nothing-new", "0", "--sources", "20", "--work", str(work)]
    command += ["--results", str(work / "results.md"), "--json", str(work / "figures.json")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((work / "figures.json").read_text()), (work / "results.md").read_text(), work


def test_the_run_processes_the_new_images_and_skips_the_seeded_ones(nightly):
    figures, _, work = nightly
    night = figures["nightly"]
    summaries = [json.loads(p.read_text()) for p in (work / f"out-isic-archive-{IMAGES}-{NEW}" / "runs").glob("*.json")]
    run = next(s for s in summaries if s.get("run_id") == night["run_id"])  # a compaction names its own id
    assert "seeded_by" not in run and "kind" not in run  # the nightly run, not the seeded one or a compaction
    assert run["counts"] == night["counts"]
    assert (run["counts"]["processed"], run["counts"]["skipped"], run["counts"]["errors"]) == (NEW, IMAGES - NEW, 0)
    assert night["run"]["returncode"] == 0 and night["live_rows_after"] == IMAGES


def test_the_archive_and_its_bytes_are_what_the_folder_holds(nightly):
    figures, _, work = nightly
    archive = work / f"isic-archive-{IMAGES}"
    images = sorted(archive.glob("ISIC_*.jpg"))
    assert len(images) == IMAGES == figures["listing"][0]["listed"]
    assert figures["nightly"]["archive_bytes"] == sum(p.stat().st_size for p in images)
    assert figures["nightly"]["new_bytes"] == sum(p.stat().st_size for p in images[-NEW:])
    assert len({p.stat().st_ino for p in images}) == len(figures["sources"])  # hard links to the sources


def test_the_cams_files_are_counted_as_parquet_reads_them(nightly):
    figures, _, work = nightly
    night = figures["nightly"]
    files = sorted((work / f"out-isic-archive-{IMAGES}-{NEW}" / "cams").rglob("*.parquet"))
    last = night["cams_compacted"] if night.get("compact", {}).get("returncode") == 0 else night["cams_after"]
    assert last["files"] == len(files) and last["rows"] == sum(pq.read_metadata(p).num_rows for p in files)
    assert night["cams_before"]["rows"] == IMAGES - NEW
    assert night["cams_after"]["rows"] == night["cams_before"]["rows"] + night["counts"]["processed"]


def test_compact_keeps_every_row_in_fewer_files(nightly):
    night = nightly[0]["nightly"]
    if "No such command" in night.get("compact_error", ""):
        pytest.skip("camjobs has no compact command in this checkout")
    assert night["compact"]["returncode"] == 0 and night["live_rows_compacted"] == IMAGES
    assert night["cams_compacted"]["files"] < night["cams_after"]["files"]


def test_the_archives_files_opened_include_every_new_image(nightly):
    run = nightly[0]["nightly"]["run"]
    if "opened" not in run:
        pytest.skip("strace is not installed")
    assert run["opened"]["files"] >= NEW and run["opened"]["bytes"] >= nightly[0]["nightly"]["new_bytes"]


def test_the_results_file_states_each_target_and_the_counts(nightly):
    figures, text, _ = nightly
    counts = ", ".join(f"{k} {v:,}" for k, v in figures["nightly"]["counts"].items())
    assert f"| run summary's counts | {counts} |" in text
    for target in ("of the archive's", "at 1,000,000 images", "listed images", "rows after compact"):
        line = next(x for x in text.splitlines() if target in x)
        assert line.rstrip(" |").rsplit("|", 1)[1].strip() in ("**PASS**", "**MISS**", "n/a")
