"""The job configs in configs/: each loads through the CLI's own loader into a valid RunConfig,
and the loader rejects what a config must not contain, naming the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest
import yaml

from camjobs.cli import load_run_config
from camjobs.config import ConfigError, RunConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
CONFIG_FILES = sorted(CONFIGS.glob("*.yaml")) + sorted(CONFIGS.glob("*.yml"))
REQUIRED = ("ham10000.yaml", "isic2019.yaml", "nightly.yaml", "cpu-smoke.yaml")


def test_the_expected_configs_exist():
    names = {p.name for p in CONFIG_FILES}
    assert set(REQUIRED) <= names, f"missing: {set(REQUIRED) - names}"
    assert {p.name for p in CONFIGS.iterdir() if p.is_file()} == names, "only YAML configs belong in configs/"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_config_loads_through_the_cli_loader(path):
    cfg = load_run_config(path, {})
    assert isinstance(cfg, RunConfig)
    assert cfg.checkpoint, "the shipped configs name a checkpoint (camjobs train's format)"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_config_is_complete_and_commented(path):
    text = path.read_text()
    keys = set(yaml.safe_load(text))
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    # every option spelled out (null where the default is wanted), so a config documents the job
    assert keys == fields, f"{path.name}: missing {sorted(fields - keys)}"
    comments = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    assert len(comments) >= 5, f"{path.name} explains too little"


def test_cpu_smoke_runs_anywhere():
    cfg = load_run_config(CONFIGS / "cpu-smoke.yaml", {})
    for value in (cfg.data, cfg.output, cfg.checkpoint):
        assert not Path(value).is_absolute() and "://" not in value, value
        assert value.startswith("camjobs-demo/"), "below the git-ignored folder `camjobs demo` and synth use"
    assert cfg.gpus_per_actor == 0 and cfg.address is None and cfg.weights is None
    assert cfg.layout == "ham10000"  # what `camjobs synth` writes


def test_cluster_configs_use_gpus_and_shared_locations():
    for name in ("ham10000.yaml", "isic2019.yaml", "nightly.yaml"):
        cfg = load_run_config(CONFIGS / name, {})
        assert cfg.gpus_per_actor == 1.0, name
        for value in (cfg.data, cfg.output):
            assert "://" in value or value.startswith("/mnt/"), f"{name}: {value} is not on storage every node sees"
        assert cfg.checkpoint.startswith("/mnt/models/"), name


def test_nightly_config_is_incremental_and_flags_still_override():
    cfg = load_run_config(CONFIGS / "nightly.yaml", {"gpus_per_actor": 0.0, "output": "/tmp/x", "actors": None})
    assert cfg.incremental and cfg.gpus_per_actor == 0.0 and cfg.output == "/tmp/x"


@pytest.mark.parametrize(
    "extra, named",
    [
        ("batch_sise: 8\n", "batch_sise"),  # unknown key
        ("actors: two\n", "actors"),  # wrong type
        ("threshold: high\n", "threshold"),
        ("incremental: yes please\n", "incremental"),
        ("classes: 3\n", "classes"),
        ("follow_symlinks: 1\n", "follow_symlinks"),
    ],
)
def test_a_config_with_an_unknown_key_or_a_wrong_type_is_rejected_naming_the_key(tmp_path, extra, named):
    base = (CONFIGS / "cpu-smoke.yaml").read_text()
    key = extra.split(":")[0]
    lines = [line for line in base.splitlines() if not line.startswith(f"{key}:")]
    bad = tmp_path / "bad.yaml"
    bad.write_text("\n".join(lines) + "\n" + extra)
    with pytest.raises(ConfigError, match=named):
        load_run_config(bad, {})


def test_a_config_that_is_not_yaml_is_a_config_error(tmp_path):
    from typer.testing import CliRunner

    from camjobs.cli import app

    bad = tmp_path / "broken.yaml"
    bad.write_text("data: [d\noutput: o\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_run_config(bad, {})
    result = CliRunner().invoke(app, ["run", "--config", str(bad)])
    assert result.exit_code == 2 and "broken.yaml" in result.output


def test_a_config_that_is_not_a_mapping_is_rejected(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- data: d\n- output: o\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_run_config(bad, {})


@pytest.mark.slow
def test_cpu_smoke_config_runs_the_whole_job(ray_cluster, tmp_path):
    """configs/cpu-smoke.yaml as shipped, with its three paths moved below tmp_path by flags.

    (The relative paths themselves cannot be used here: the session's shared Ray cluster has
    its own working directory, whereas `camjobs run` starts a local cluster in the caller's.)
    """
    from typer.testing import CliRunner

    from camjobs.cli import app
    from camjobs.labels.verify import verify_output
    from camjobs.models.networks import build_model, save_checkpoint
    from camjobs.synth import synth_dataset

    shipped = load_run_config(CONFIGS / "cpu-smoke.yaml", {})
    data, output, checkpoint = (tmp_path / p for p in (shipped.data, shipped.output, shipped.checkpoint))
    summary = synth_dataset(data, n=8, seed=1, width=160, height=120)
    classes = sorted(summary.class_counts)
    # an untrained model exercises every stage; `camjobs train` writes the same format
    save_checkpoint(checkpoint, build_model("resnet18", len(classes)), arch="resnet18", classes=classes, input_size=64)

    args = [
        "run",
        "--config",
        str(CONFIGS / "cpu-smoke.yaml"),
        "--data",
        str(data),
        "--output",
        str(output),
        "--checkpoint",
        str(checkpoint),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "8 processed, 0 errors" in result.output
    assert len(list((output / "runs").glob("*.json"))) == 1

    # run again, as a smoke test is: its rows replace the last run's (overwrite: true), no duplicates
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "8 processed, 0 errors" in again.output, again.output
    cams = pd.read_parquet(output / "cams")
    assert len(cams) == 8 and cams.image_id.is_unique and len(list((output / "runs").glob("*.json"))) == 2
    assert verify_output(str(output)).ok
