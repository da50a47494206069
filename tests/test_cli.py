"""The CLI: typed config from YAML and flags, exit codes a scheduler can act on."""

from __future__ import annotations

import re
import subprocess
import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

from camjobs import config
from camjobs.cli import app, load_run_config
from camjobs.config import ConfigError, RunConfig

runner = CliRunner()


def test_yaml_then_flags_override(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("data: /d\noutput: /o\nmodel: resnet18\nclasses: [a, b]\nthreshold: 0.3\nactors: 2\n")
    cfg = load_run_config(config, {"threshold": 0.25, "actors": None, "method": "gradcam"})
    assert (cfg.data, cfg.threshold, cfg.actors, cfg.method, cfg.classes) == ("/d", 0.25, 2, "gradcam", ["a", "b"])


@pytest.mark.parametrize(
    "values, named",
    [
        ({"data": "d", "output": "o", "model": "resnet18", "classes": "a", "treshold": 0.2}, "treshold"),
        ({"data": "d", "output": "o", "model": "resnet18", "classes": "a", "threshold": "high"}, "threshold"),
        ({"data": "d", "output": "o", "model": "resnet18", "classes": "a", "actors": 1.5}, "actors"),
        ({"data": "d", "output": "o", "model": "resnet18", "classes": "a", "method": "lime"}, "method"),
        ({"data": "d", "output": "o"}, "checkpoint"),
        ({"output": "o", "checkpoint": "c"}, "data"),
    ],
)
def test_bad_options_are_named(values, named):
    with pytest.raises(ConfigError, match=named):
        RunConfig.from_mapping(values)


def test_help_texts_show_defaults_and_brackets():
    # Rich markup would read "[default: x]" or "[threshold, 1]" as a style tag and drop it.
    result = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    defaults = RunConfig.from_mapping({"data": "d", "output": "o", "model": "resnet18", "classes": "a"})
    for value in (
        defaults.method,
        defaults.threshold,
        defaults.target,
        defaults.max_error_fraction,
        defaults.decode_on,
    ):
        assert f"(default: {value})" in result.output
    assert "[threshold, 1]" in runner.invoke(app, ["export", "--help"], env={"COLUMNS": "400"}).output


# Every choice option of every command, with its Choice (the oracle) and the other options it needs.
CHOICE_OPTIONS = [
    ("run", "--layout", config.Layout, []),
    ("run", "--method", config.Method, []),
    ("run", "--target", config.Target, []),
    ("run", "--precision", config.Precision, []),
    ("run", "--decode-on", config.DecodeOn, []),
    ("submit", "--method", config.Method, []),
    ("synth", "--layout", config.SynthLayout, ["out"]),
    ("train", "--pooling", config.Pooling, ["--data", "d", "--out", "m.pt"]),
    ("train", "--layout", config.Layout, ["--data", "d", "--out", "m.pt"]),
    ("export", "--format", config.ExportFormat, ["--output", "o", "--to", "t"]),
    ("export", "--categories", config.CategoryMode, ["--output", "o", "--format", "coco", "--to", "t"]),
    ("export", "--boxes", config.BoxSource, ["--output", "o", "--format", "coco", "--to", "t"]),
    ("export", "--images", config.ImageMode, ["--output", "o", "--format", "yolo", "--to", "t"]),
    ("viz", "--sort", config.GallerySort, ["--output", "o", "--to", "t"]),
    ("viz", "--layout", config.Layout, ["--output", "o", "--to", "t"]),
]


@pytest.mark.parametrize(
    "command, option, choice, needed",
    CHOICE_OPTIONS,
    ids=[f"{command} {option}" for command, option, _, _ in CHOICE_OPTIONS],
)
def test_help_lists_a_choice_options_values_and_a_bad_value_exits_2(command, option, choice, needed):
    shown = runner.invoke(app, [command, "--help"], env={"COLUMNS": "400"})
    values = "|".join(re.escape(member.value) for member in choice)
    assert re.search(rf"{option} [<\[]{values}[>\]]", shown.output), shown.output
    bad = runner.invoke(app, [command, *needed, option, "no-such-value"])
    assert bad.exit_code == 2 and "no-such-value" in bad.output


def test_choices_reach_the_config_as_plain_strings():
    cfg = load_run_config(
        None,
        {
            "data": "d",
            "output": "o",
            "model": "resnet18",
            "classes": "a",
            "method": config.Method.GRADCAM_PP,
            "layout": config.Layout.ISIC2017,
        },
    )
    assert (cfg.method, cfg.layout) == ("gradcam++", "isic2017")
    assert type(cfg.method) is str and type(cfg.layout) is str  # to_dict() and run summaries hold strings


def test_usage_error_exits_2_and_names_the_key(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("data: /d\noutput: /o\ncheckpoint: c.pt\nbatchsize: 4\n")
    result = runner.invoke(app, ["run", "--config", str(config)])
    assert result.exit_code == 2 and "batchsize" in result.output


@pytest.mark.slow
def test_run_command_writes_parquet_and_exit_3_over_error_budget(ray_cluster, isic2017_mini, tmp_path):
    output = tmp_path / "out"
    args = [
        "run",
        "--data",
        str(isic2017_mini),
        "--output",
        str(output),
        "--model",
        "resnet18",
        "--classes",
        "melanoma,nevus,seborrheic_keratosis",
        "--input-size",
        "64",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "6 processed, 0 errors" in result.output
    assert len(pd.read_parquet(output / "cams")) == 6

    data = tmp_path / "folder"
    data.mkdir()
    (data / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    (data / "ok.png").write_bytes(
        (isic2017_mini / "ISIC-2017_Training_Part1_GroundTruth/ISIC_0014628_segmentation.png").read_bytes()
    )
    failing = runner.invoke(
        app,
        [
            "run",
            "--data",
            str(data),
            "--output",
            str(tmp_path / "out2"),
            "--model",
            "resnet18",
            "--classes",
            "a,b",
            "--input-size",
            "64",
            "--max-error-fraction",
            "0.1",
        ],
    )
    assert failing.exit_code == 3 and "max-error-fraction" in failing.output
    assert (
        len(pd.read_parquet(tmp_path / "out2" / "errors")) == 1
        and len(pd.read_parquet(tmp_path / "out2" / "cams")) == 1
    )


@pytest.mark.slow
def test_run_on_an_isic_archive_download_with_a_label_column(ray_cluster, isic2017_mini, tmp_path):
    """The YAML config's label_column reaches the listing: rows carry that column's labels, and
    --target label explains each labelled image's own class."""
    import csv
    import json

    import pyarrow.dataset as pads
    from layout_fixtures import make_isic_archive

    make_isic_archive(tmp_path / "archive", isic2017_mini)
    with open(tmp_path / "archive" / "metadata.csv", newline="", encoding="utf8") as f:
        expected = {row["isic_id"]: row["benign_malignant"] or None for row in csv.DictReader(f)}
    config = tmp_path / "job.yaml"
    config.write_text(
        f"data: {tmp_path / 'archive'}\noutput: {tmp_path / 'out'}\nlabel_column: benign_malignant\n"
        "model: resnet18\nclasses: [benign, malignant]\ninput_size: 64\ntarget: label\n"
    )
    result = runner.invoke(app, ["run", "--config", str(config)])
    assert result.exit_code == 0, result.output
    columns = ["image_id", "label", "target_label"]
    rows = pads.dataset(tmp_path / "out" / "cams", format="parquet").to_table(columns=columns).to_pylist()
    assert {row["image_id"]: row["label"] for row in rows} == expected
    labelled = [row for row in rows if row["label"] is not None]
    assert all(row["target_label"] == row["label"] for row in labelled) and len(labelled) == len(rows) - 1
    summary = json.loads(next((tmp_path / "out" / "runs").glob("*.json")).read_text())
    assert summary["layout"] == "isic-archive" and summary["config"]["label_column"] == "benign_malignant"

    flags = ["run", "--data", str(tmp_path / "archive"), "--output", str(tmp_path / "out2"), "--model", "resnet18"]
    unknown = runner.invoke(app, [*flags, "--classes", "a,b", "--label-column", "diagnosis"])
    assert unknown.exit_code == 2 and "--label-column 'diagnosis'" in unknown.output and "diagnosis_3" in unknown.output
    assert not (tmp_path / "out2").exists()  # refused before the output folder is created


def test_bad_checkpoint_is_a_usage_error_exit_2(tmp_path, isic2017_mini):
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"not a checkpoint")
    result = runner.invoke(
        app, ["run", "--data", str(isic2017_mini), "--output", str(tmp_path / "o"), "--checkpoint", str(bogus)]
    )
    assert result.exit_code == 2 and f"--checkpoint {bogus}" in result.output
    assert not (tmp_path / "o").exists()  # refused before the output folder is made


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "camjobs", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "run" in result.stdout and "demo" in result.stdout


HEAVY = ("torch", "torchvision", "ray", "timm", "pycocotools")
COMMANDS = [["--help"], *([name, "--help"] for name in ("run", "verify", "export", "evaluate", "viz", "submit"))]

# In a fresh interpreter: each command line in turn, then the job module; what each imported of HEAVY.
_IMPORTED_BY = """
import json, runpy, sys
heavy, imported = json.loads(sys.argv[1]), {}
for argv in json.loads(sys.argv[2]):
    sys.argv = ["camjobs", *argv]
    try:
        runpy.run_module("camjobs", run_name="__main__")
    except SystemExit:
        pass
    imported[" ".join(argv)] = sorted(name for name in heavy if name in sys.modules)
import camjobs.pipeline.job
imported["import camjobs.pipeline.job"] = sorted(name for name in heavy if name in sys.modules)
print(json.dumps(imported))
"""


def test_help_the_tools_and_the_job_module_import_neither_torch_nor_ray():
    """torch and Ray take seconds to import: help, the commands that read an output, and a run with
    nothing to do never need them (the job imports them where a run starts its pipeline)."""
    import json

    command = [sys.executable, "-c", _IMPORTED_BY, json.dumps(HEAVY), json.dumps(COMMANDS)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Usage") == len(COMMANDS)  # every command printed its help
    imported = json.loads(result.stdout.splitlines()[-1])
    assert len(imported) == len(COMMANDS) + 1 and all(names == [] for names in imported.values()), imported


def test_credentials_in_uris_are_redacted():
    from camjobs.config import redact_uri

    cfg = RunConfig(
        data="s3://AKIAEXAMPLE:s3cr3t@bucket/ham?region=eu-west-1&secret_key=s3cr3t",
        output="gs://bucket/out?access_key=AKIAEXAMPLE&endpoint_override=localhost:9000",
        model="resnet18",
        classes=["a"],
    )
    shown = str(cfg.redacted())
    assert "s3cr3t" not in shown and "AKIAEXAMPLE" not in shown
    assert "bucket/ham" in shown and "region=eu-west-1" in shown and "endpoint_override=localhost%3A9000" in shown
    assert redact_uri("/local/path") == "/local/path"
