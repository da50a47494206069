"""The first run of a new user: configuration mistakes exit 2, name the flag to fix and leave no output
folder behind (camjobs.preflight); a normal `camjobs run` prints camjobs' lines and nothing of Ray's
unless --verbose; its summary records where it read and wrote."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from typer.testing import CliRunner

from camjobs.cli import app
from camjobs.models.networks import save_checkpoint
from camjobs.preflight import PreflightError, check_model_file

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["melanoma", "nevus", "seborrheic_keratosis"]
runner = CliRunner()
# What the mistakes must never show: internals instead of flags, and raw errors.
INTERNALS = re.compile(r"Errno|KeyError|Traceback|weights=|Unsupported operand|PytorchStreamReader")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real camjobs checkpoint (resnet18, the ISIC 2017 classes, 64 px)."""
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(path, torchvision.models.resnet18(num_classes=3), arch="resnet18", classes=CLASSES, input_size=64)
    return path


def _run(data, output, *model: str):
    return runner.invoke(app, ["run", "--data", str(data), "--output", str(output), *model])


def _refused(result, *words: str) -> str:
    """The one error line of a mistake that exited 2; it names `words` and no internals."""
    assert result.exit_code == 2, result.output
    assert all(word in result.output for word in words), result.output
    assert not INTERNALS.search(result.output), result.output
    return result.output


def test_a_missing_data_folder_or_a_file_as_data_exits_2_and_creates_no_output(tmp_path):
    output = tmp_path / "out"
    _refused(_run(tmp_path / "nowhere", output, "--model", "resnet18", "--classes", "a,b"), "--data", "no such folder")
    (tmp_path / "data.csv").write_text("a,b\n")
    _refused(_run(tmp_path / "data.csv", output, "--model", "resnet18", "--classes", "a,b"), "--data", "is a file")
    (tmp_path / "empty").mkdir()
    _refused(_run(tmp_path / "empty", output, "--model", "resnet18", "--classes", "a,b"), "no known dataset layout")
    assert not output.exists()


def _damaged_files(folder: Path, checkpoint: Path) -> dict[str, Path]:
    """Files a user might give as a checkpoint by mistake, each as such a file really is."""
    files = {}
    # A file that starts with "he": torch.load's weights-only unpickler reads "h" as a memo lookup.
    files["text"] = folder / "notes.pt"
    files["text"].write_text("hello, this is not a model\n")
    files["empty"] = folder / "empty.pt"
    files["empty"].write_bytes(b"")
    data = checkpoint.read_bytes()
    files["truncated"] = folder / "truncated.pt"  # a copy cut short
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["zip"] = folder / "other.zip"
    with zipfile.ZipFile(files["zip"], "w") as archive:
        archive.writestr("readme.txt", "not a checkpoint")
    files["lfs"] = folder / "lfs.pt"  # what a clone without git-lfs holds
    files["lfs"].write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 46830571\n")
    files["folder"] = folder / "model-dir.pt"
    files["folder"].mkdir()
    return files


def test_torch_itself_reports_these_files_with_internals(tmp_path, checkpoint):
    """Why camjobs looks at the file first: torch.load's own errors name its unpickler's internals."""
    files = _damaged_files(tmp_path, checkpoint)
    with pytest.raises(KeyError):
        torch.load(files["text"], weights_only=True)
    with pytest.raises(RuntimeError, match="PytorchStreamReader"):
        torch.load(files["truncated"], weights_only=True)


@pytest.mark.parametrize(
    "kind, words",
    [
        ("text", ["--checkpoint", "not a checkpoint torch.save wrote", "text file"]),
        ("empty", ["--checkpoint", "empty"]),
        ("truncated", ["--checkpoint", "truncated"]),
        ("zip", ["--checkpoint", "not one torch.save wrote"]),
        ("lfs", ["--checkpoint", "Git LFS pointer"]),
        ("folder", ["--checkpoint", "is a folder"]),
    ],
)
def test_a_checkpoint_that_is_not_one_exits_2_with_the_flag_and_creates_no_output(
    tmp_path, isic2017_mini, checkpoint, kind, words
):
    path = _damaged_files(tmp_path, checkpoint)[kind]
    output = tmp_path / "out"
    _refused(_run(isic2017_mini, output, "--checkpoint", str(path)), *words)
    assert not output.exists()


def test_a_missing_or_unreadable_checkpoint_or_weights_file_exits_2(tmp_path, isic2017_mini):
    output = tmp_path / "out"
    _refused(_run(isic2017_mini, output, "--checkpoint", str(tmp_path / "none.pt")), "--checkpoint", "no such file")
    args = ["--model", "resnet18", "--classes", "a,b", "--weights", str(tmp_path / "resnet18.pth")]
    _refused(_run(isic2017_mini, output, *args), "--weights", "no such file")
    # The kernel refuses to read this file at offset 0 (no memory is mapped there), root or not.
    _refused(_run(isic2017_mini, output, "--checkpoint", "/proc/self/mem"), "--checkpoint", "cannot be read")
    assert not output.exists()


def test_files_torch_and_safetensors_wrote_pass(tmp_path, checkpoint):
    model = torchvision.models.resnet18(num_classes=3)
    legacy = tmp_path / "legacy.pt"  # torch.save's format before torch 1.6: a pickle
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    safetensors = tmp_path / "weights.safetensors"
    save_file(model.state_dict(), safetensors)
    for path in (checkpoint, legacy, safetensors):
        check_model_file(str(path), "--weights-file")
    torch.load(legacy, weights_only=True)  # the oracle: torch reads what passed
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(PreflightError, match="--weights-file .* is not a safetensors file"):
        check_model_file(str(tmp_path / "bad.safetensors"), "--weights-file")


def test_an_output_that_is_a_file_exits_2_without_touching_it(tmp_path, isic2017_mini, checkpoint):
    target = tmp_path / "results.parquet"
    target.write_bytes(b"keep me")
    _refused(_run(isic2017_mini, target, "--checkpoint", str(checkpoint)), "--output", "is a file")
    _refused(_run(isic2017_mini, target / "sub", "--checkpoint", str(checkpoint)), "--output", "which is a file")
    assert target.read_bytes() == b"keep me"


def test_train_on_images_without_labels_names_the_layout_and_the_folder_to_give(tmp_path, isic2017_mini):
    images = isic2017_mini / "ISIC-2017_Training_Data"  # the images folder of a labelled download
    out = tmp_path / "model.pt"
    message = _refused(runner.invoke(app, ["train", "--data", str(images), "--out", str(out)]), "folder layout")
    assert f"give the dataset's root instead: {isic2017_mini} (the isic2017 layout" in message.replace("\n", " ")
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "ISIC_0014628.jpg").write_bytes((images / "ISIC_0014628.jpg").read_bytes())
    message = _refused(runner.invoke(app, ["train", "--data", str(flat), "--out", str(out)]), "folder layout")
    assert "HAM10000_metadata.csv" in message
    assert not out.exists()


def test_train_checks_its_start_weights_and_out_first(tmp_path, isic2017_mini):
    notes = tmp_path / "notes.pt"
    notes.write_text("hello\n")
    args = ["train", "--data", str(isic2017_mini), "--out", str(tmp_path / "m.pt")]
    _refused(runner.invoke(app, [*args, "--weights-file", str(notes)]), "--weights-file", "text file")
    _refused(runner.invoke(app, [*args, "--weights", str(tmp_path / "none.pth")]), "--weights", "no such file")
    _refused(runner.invoke(app, ["train", "--data", str(isic2017_mini), "--out", str(tmp_path)]), "--out", "folder")


# --- a real run, as a new user types it ----------------------------------------------------------------

NOISE = re.compile(r"WARNING|ERROR|Traceback|will hang|core_worker|Running Dataset|logging_progress")


def _camjobs(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m camjobs ...` in its own process, from `cwd`, with this checkout first on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_BACKEND_LOG_LEVEL")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "camjobs", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_normal_run_prints_no_ray_lines_records_absolute_paths_and_leaves_no_staging(
    tmp_path, isic2017_mini, checkpoint
):
    """Relative paths, as typed in a shell; stdout and stderr both read, and every line of them."""
    (tmp_path / "model.pt").write_bytes(checkpoint.read_bytes())
    data = os.path.relpath(isic2017_mini, tmp_path)
    args = ["run", "--data", data, "--output", "out", "--checkpoint", "model.pt"]
    quiet = _camjobs(tmp_path, *args)
    printed = quiet.stdout + quiet.stderr
    assert quiet.returncode == 0, printed
    assert re.search(r"^run \S+: 6 processed, 0 errors$", quiet.stdout, re.M), printed
    assert [line for line in printed.splitlines() if NOISE.search(line)] == []
    assert all(line.startswith(("camjobs: ", "run ", "results: ")) for line in printed.splitlines()), printed

    (summary_path,) = (tmp_path / "out" / "runs").glob("*.json")
    config = json.loads(summary_path.read_text())["config"]
    for name, where in (("data", isic2017_mini), ("output", tmp_path / "out"), ("checkpoint", tmp_path / "model.pt")):
        assert os.path.isabs(config[name]) and Path(config[name]).samefile(where), (name, config[name])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cams", "errors", "runs"]  # no _staging/

    # --rehash: every image is read and hashed in the pipeline (else, with nothing new, Ray is not started)
    verbose = _camjobs(tmp_path, *args, "--incremental", "--rehash", "--verbose")
    assert verbose.returncode == 0, verbose.stdout + verbose.stderr
    assert "Starting execution of Dataset" in verbose.stdout + verbose.stderr  # Ray Data's own log line
    assert "6 skipped" in verbose.stdout
