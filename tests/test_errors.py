"""Exit codes and errors (camjobs.errors): each kind of mistake has one code, the same from every
command; the error_type codes written to errors/ are those schema.ERROR_CODES documents; each
shared constant has one owner, and the module that owns the defaults loads no heavy library."""

from __future__ import annotations

import ast
import importlib
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import camjobs
from camjobs import config, errors
from camjobs.cli import app
from camjobs.schema import CAMS_SCHEMA, ERROR_CODES, SCHEMA_VERSION

PACKAGE = Path(camjobs.__file__).resolve().parent
runner = CliRunner()


def test_exit_codes():
    assert (errors.EXIT_OK, errors.EXIT_FAILED, errors.EXIT_USAGE, errors.EXIT_ERROR_BUDGET) == (0, 1, 2, 3)
    assert (errors.EXIT_INTERRUPTED, errors.EXIT_TERMINATED) == (130, 143)  # 128 + SIGINT, 128 + SIGTERM
    assert [errors.Interrupted(s).exit_code for s in (signal.SIGINT, signal.SIGTERM)] == [130, 143]
    assert errors.UsageError.exit_code == errors.EXIT_USAGE and errors.JobError.exit_code == errors.EXIT_FAILED


@pytest.mark.parametrize(
    "module, name, code, builtin",
    [
        ("camjobs.config", "ConfigError", 2, ValueError),
        ("camjobs.layouts", "LayoutError", 2, ValueError),
        ("camjobs.labels.export", "ExportError", 2, ValueError),
        ("camjobs.labels.viz", "VizError", 2, ValueError),
        ("camjobs.labels.scores", "EvaluationError", 2, ValueError),
        ("camjobs.output", "NoResults", 2, ValueError),
        ("camjobs.output", "OutputExists", 2, ValueError),
        ("camjobs.lock", "OutputLocked", 1, RuntimeError),
        ("camjobs.preflight", "PreflightError", 2, ValueError),
        ("camjobs.models.train_data", "TrainingDataError", 2, ValueError),
        ("camjobs.cluster.submit", "SubmitError", 2, Exception),
    ],
)
def test_each_error_carries_its_exit_code_and_keeps_its_builtin_base(module, name, code, builtin):
    error = getattr(importlib.import_module(module), name)
    assert issubclass(error, errors.CamjobsError) and issubclass(error, builtin)  # callers catch either
    assert error("x").exit_code == code


def test_an_error_can_carry_its_own_code_across_processes():
    error = pickle.loads(pickle.dumps(errors.CamjobsError("over budget", exit_code=3)))
    assert (str(error), error.exit_code) == ("over budget", 3)
    assert pickle.loads(pickle.dumps(config.ConfigError("bad key"))).exit_code == 2


# --- the same mistake, the same code, from every command ------------------------------------------


@pytest.fixture
def no_layout(tmp_path) -> Path:
    """A dataset folder in no known layout: nothing in it."""
    folder = tmp_path / "not-a-dataset"
    folder.mkdir()
    return folder


@pytest.fixture
def one_row_output(tmp_path) -> Path:
    """An output folder with one cams row (no heatmap, no boxes): enough to reach the dataset."""
    output = tmp_path / "out"
    (output / "cams").mkdir(parents=True)
    row = {name: None for name in CAMS_SCHEMA.names}
    row.update(
        image_id="ISIC_0000001",
        source_path=str(tmp_path / "ISIC_0000001.jpg"),
        width=64,
        height=48,
        pred_label="nevus",
        pred_score=0.9,
        method="cam",
        threshold=0.2,
        boxes=[],
        run_id="run1",
        model_sha256="0" * 64,
        target_mode="predicted",
        input_size=64,
        schema_version=SCHEMA_VERSION,
    )
    pq.write_table(pa.Table.from_pylist([row], schema=CAMS_SCHEMA), output / "cams" / "part-0.parquet")
    return output


def test_a_dataset_in_no_known_layout_exits_2_from_every_command_that_reads_one(no_layout, one_row_output, tmp_path):
    data = str(no_layout)
    commands = {
        "run": [
            "run",
            "--data",
            data,
            "--output",
            str(tmp_path / "run-out"),
            "--model",
            "resnet18",
            "--classes",
            "a,b",
        ],
        "train": ["train", "--data", data, "--out", str(tmp_path / "model.pt")],
        "viz": ["viz", "--output", str(one_row_output), "--to", str(tmp_path / "gallery"), "--data", data],
        "evaluate": ["evaluate", "--output", str(one_row_output), "--data", data, "--report", str(tmp_path / "r")],
    }
    codes = {name: runner.invoke(app, args) for name, args in commands.items()}
    assert {name: result.exit_code for name, result in codes.items()} == dict.fromkeys(commands, 2), {
        name: result.output for name, result in codes.items()
    }
    for result in codes.values():
        assert "no known dataset layout" in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--data", "d", "--output", "o", "--model", "resnet18", "--classes", "a,b"],
        ["train", "--data", "d", "--out", "m.pt"],
        ["viz", "--output", "o", "--to", "g"],
        ["synth", "s"],
    ],
    ids=lambda args: args[0],
)
def test_an_unknown_layout_name_exits_2_from_every_command_that_takes_one(args):
    result = runner.invoke(app, [*args, "--layout", "isic2016"])
    assert result.exit_code == 2 and "isic2016" in result.output


def test_an_output_without_results_exits_2_from_every_command_that_reads_one(tmp_path):
    empty = str(tmp_path / "nothing-here")
    commands = {
        "export": ["export", "--output", empty, "--format", "coco", "--to", str(tmp_path / "c.json")],
        "viz": ["viz", "--output", empty, "--to", str(tmp_path / "gallery")],
        "evaluate": ["evaluate", "--output", empty, "--masks", str(tmp_path)],
    }
    codes = {name: runner.invoke(app, args).exit_code for name, args in commands.items()}
    assert codes == dict.fromkeys(commands, 2)


# --- errors/ codes -----------------------------------------------------------------------------------


def _mentions_error_type(target: ast.expr) -> bool:
    node = target.value if isinstance(target, ast.Subscript) else target
    return (isinstance(node, ast.Name) and node.id == "error_type") or (
        isinstance(node, ast.Attribute) and node.attr == "error_type"
    )


def _error_type_values(node: ast.AST) -> list[ast.expr]:
    """The expressions a node gives an error_type: ImageInputError(code, ...), ImageRecord's fifth
    argument, error_type=..., and error_type[...] = ... (alone or in a tuple assignment)."""
    if isinstance(node, ast.Call):
        name = getattr(node.func, "id", getattr(node.func, "attr", None))
        values = [keyword.value for keyword in node.keywords if keyword.arg == "error_type"]
        if name == "ImageInputError" and node.args:
            values.append(node.args[0])
        if name == "ImageRecord" and len(node.args) > 4:
            values.append(node.args[4])
        return values
    if isinstance(node, ast.Assign):
        values = []
        for target in node.targets:
            if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                values += [v for t, v in zip(target.elts, node.value.elts) if _mentions_error_type(t)]
            elif _mentions_error_type(target):
                values.append(node.value)
        return values
    return []


def _strings(value: ast.expr) -> list[ast.Constant]:
    """The string literals an expression can evaluate to: "code", x or "code", a if c else "code"."""
    if isinstance(value, ast.Constant):
        return [value] if isinstance(value.value, str) else []
    if isinstance(value, ast.BoolOp):
        return [leaf for operand in value.values for leaf in _strings(operand)]
    if isinstance(value, ast.IfExp):
        return _strings(value.body) + _strings(value.orelse)
    return []


def error_types_written() -> dict[str, str]:
    """Every string the package's code gives an error_type, and where (file:line)."""
    found: dict[str, str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for value in _error_type_values(node):
                for leaf in _strings(value):
                    found.setdefault(leaf.value, f"{path.relative_to(PACKAGE)}:{leaf.lineno}")
    return found


def test_every_error_type_written_is_a_documented_code():
    written = error_types_written()
    undocumented = {code: where for code, where in written.items() if code not in ERROR_CODES}
    assert not undocumented, f"error_type codes missing from schema.ERROR_CODES: {undocumented}"
    assert set(written) == set(ERROR_CODES), f"documented but never written: {set(ERROR_CODES) - set(written)}"
    assert all(isinstance(text, str) and text for text in ERROR_CODES.values())


# --- one owner per constant ----------------------------------------------------------------------------


def test_shared_constants_are_imported_from_their_owner():
    from camjobs import cam, layouts
    from camjobs import images as decode
    from camjobs.labels import scores, truth
    from camjobs.models import networks as models
    from camjobs.pipeline import localize

    assert localize.DEFAULT_THRESHOLD is config.DEFAULT_THRESHOLD is scores.DEFAULT_THRESHOLD
    assert decode.DEFAULT_MAX_PIXELS is config.DEFAULT_MAX_PIXELS
    assert truth.MASK_SUFFIX is layouts.MASK_SUFFIX
    assert cam.METHODS is config.METHODS and layouts.LAYOUTS is config.LAYOUTS
    assert config.Pooling.values() == models.POOLINGS
    assert config.Layout.values() == ("auto", *config.LAYOUTS)


def _literals(value) -> list[str]:
    """Where the package's code (docstrings aside) spells `value` as a literal."""
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            spelled = None
            if isinstance(node, ast.Constant) and type(node.value) is type(value):
                spelled = node.value
            elif isinstance(node, ast.Tuple) and all(isinstance(e, ast.Constant) for e in node.elts):
                spelled = tuple(e.value for e in node.elts)
            if spelled == value:
                hits.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    return hits


@pytest.mark.parametrize(
    "value, owner",
    [
        ("_segmentation", "layouts.py"),
        (100_000_000, "config.py"),
        (config.METHODS, None),
        (config.LAYOUTS, None),
        (config.Layout.values(), None),
    ],
    ids=["mask suffix", "max pixels", "methods", "layouts", "layout choices"],
)
def test_a_shared_constant_is_spelled_once(value, owner):
    hits = _literals(value)
    if owner is None:  # spelled as the members of its Choice in camjobs.config, never as a tuple
        assert hits == []
    else:
        assert len(hits) == 1 and hits[0].startswith(owner + ":"), hits


def test_the_config_and_the_cli_load_neither_opencv_nor_torch_nor_ray():
    code = (
        "import sys, camjobs.config, camjobs.cli, camjobs.errors; "
        "print(sorted({'cv2', 'torch', 'ray', 'torchvision'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"
