"""The package's shape: the README's tree is the code's, the label tools stay free of torch and Ray,
and no module or function outgrows what a reader holds in mind."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "camjobs"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
LABEL_TOOLS = ("evaluate", "export", "viz", "verify")


def _modules() -> set[str]:
    """Every module and subpackage of camjobs, as paths relative to the package ("pipeline/job.py")."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if path.name in ("__init__.py", "__main__.py"):
            if relative.parent != Path("."):
                found.add(f"{relative.parent.as_posix()}/")
            continue
        found.add(relative.as_posix())
    return found


def _readme_tree() -> set[str]:
    """The paths of the README's package tree: the text block under "## The code", indented by two per level."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## The code\n", 1)[1]
    block = re.search(r"```text\ncamjobs/\n(.*?)```", section, re.S).group(1)
    paths, parents = set(), []
    for line in block.splitlines():
        name = line.strip().split()[0]
        depth = (len(line) - len(line.lstrip())) // 2 - 1
        parents[depth:] = [name] if name.endswith("/") else []
        paths.add("".join(parents[:depth]) + name)
    return paths


def test_readme_tree_lists_every_module_and_no_other():
    tree, modules = _readme_tree(), _modules()
    assert not modules - tree, f"modules missing from the README's tree: {sorted(modules - tree)}"
    assert not tree - modules, f"the README's tree names modules that do not exist: {sorted(tree - modules)}"


def test_readme_pipeline_table_names_modules_of_the_tree():
    text = (REPO / "README.md").read_text()
    table = text.split("\n## The pipeline\n", 1)[1].split("\n## ", 1)[0]
    named = {m.removeprefix("camjobs/") for m in re.findall(r"`(camjobs/[\w/]+\.py)`", table)}
    assert named, "the pipeline section names no module"
    assert named <= _readme_tree(), f"not in the package tree: {sorted(named - _readme_tree())}"


@pytest.mark.parametrize("tool", LABEL_TOOLS)
def test_label_tools_import_neither_torch_nor_ray(tool):
    probe = (
        f"import sys, camjobs.labels.{tool}\n"
        "heavy = sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'torchvision', 'ray')"
        " or n.startswith(('camjobs.pipeline', 'camjobs.models', 'camjobs.cam', 'camjobs.cluster')))\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "", f"camjobs.labels.{tool} imports {result.stdout.strip()}"


def test_no_module_or_function_too_long():
    long_modules, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        where = path.relative_to(REPO).as_posix()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{where} ({len(source.splitlines())} lines)")
        for node in ast.walk(ast.parse(source, where)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long_functions.append(f"{where}:{node.lineno} {node.name} ({lines} lines)")
    assert not long_modules, f"over {MAX_MODULE_LINES} lines: {long_modules}"
    assert not long_functions, f"over {MAX_FUNCTION_LINES} lines: {long_functions}"
