"""Deployment files: the container, the KubeRay and Kubernetes manifests, the cluster launcher
config and the single-machine schedulers in deploy/.

The main point: every `camjobs ...` command line written in them (RayJob entrypoints,
container command/args, systemd Exec lines, crontab lines, launcher commands, commented
examples, the README's deployment sections) is parsed by the CLI's own parser, and any
`--config` it names is loaded with the CLI's own loader, so a manifest cannot use an option,
a command or a config key that camjobs does not have. The KubeRay manifests are held to
KubeRay's CRDs and its controller's documented behaviour: the fields it knows, the deletion rules
it accepts and what they match, the labels it puts on the RayJobs of a RayCronJob. The one thing
run is the CronJob pod's shell script, as PID 1 with a stand-in `camjobs`, to see that SIGTERM
stops the Ray job it submitted.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import ray
import typer
import yaml

from camjobs.cli import app, load_run_config
from camjobs.config import ConfigError, RunConfig

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
CONFIGS = REPO / "configs"
DOCKERFILE = REPO / "Dockerfile"
README = REPO / "README.md"
README_SECTIONS = ("Running nightly", "Container and Kubernetes")

K8S = DEPLOY / "k8s"
RAYJOB = K8S / "rayjob-ham10000.yaml"
RAYCRONJOB = K8S / "raycronjob-nightly.yaml"
RAYCLUSTER = K8S / "raycluster.yaml"
CRONJOB = K8S / "cronjob-nightly-submit.yaml"
PREREQUISITES = K8S / "prerequisites.yaml"
LAUNCHER = DEPLOY / "ray-cluster" / "aws-gpu.yaml"
SERVICE = DEPLOY / "systemd" / "camjobs-nightly.service"
TIMER = DEPLOY / "systemd" / "camjobs-nightly.timer"
CRONTAB = DEPLOY / "cron" / "camjobs.crontab"

# The files that exist to run camjobs: each must contain at least one camjobs command.
RUNS_CAMJOBS = (RAYJOB, RAYCRONJOB, CRONJOB, SERVICE, CRONTAB)
# The nightly schedulers: each must run configs/nightly.yaml incrementally.
NIGHTLY = (RAYCRONJOB, CRONJOB, SERVICE, CRONTAB)

SUBCOMMAND_WORDS = r"(?:run|submit|status|logs|stop|list|synth|train|demo)"
# (not `kubectl -n camjobs logs ...`: there camjobs is the namespace)
MENTION = re.compile(rf"(?<![\w/.-])(?<!-n )(?<!namespace )(?<!namespace=)camjobs\s+{SUBCOMMAND_WORDS}\b")
COMMENTED_COMMAND = re.compile(
    rf"^\s*#\s*(?:\$\s+)?(?P<cmd>(?:\S*/)?camjobs\s+{SUBCOMMAND_WORDS}\b.*|ray\s+job\s+submit\b.*\s--\s.*)$"
)
CRON_FIELD = re.compile(r"^[\d*/,-]+$")


# --------------------------------------------------------------------------------------------
# Finding camjobs command lines
# --------------------------------------------------------------------------------------------

SHELLS = {"sh", "bash", "dash", "zsh"}
# a word made only of these is a control operator: `&&`, `;`, `|`, `&`, a newline, `&` + newline ...
OPERATOR_CHARS = set("();|&\n")
# wrapper -> options of that wrapper that take a value; the wrapper's own positional
# arguments before the wrapped command (timeout's duration, flock's lock file) are skipped too
WRAPPERS: dict[str, tuple[set[str], int]] = {
    "exec": (set(), 0),
    "nohup": (set(), 0),
    "command": (set(), 0),
    "time": (set(), 0),
    "env": ({"-u", "-C", "--unset", "--chdir"}, 0),
    "nice": ({"-n", "--adjustment"}, 0),
    "ionice": ({"-c", "-n", "-p", "--class", "--classdata"}, 0),
    "sudo": ({"-u", "-g", "-C", "-D", "--user", "--group"}, 0),
    "timeout": ({"-s", "-k", "--signal", "--kill-after"}, 1),
    "flock": ({"-w", "-E", "--timeout", "--conflict-exit-code"}, 1),
}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


class _KeepNewlines(io.StringIO):
    """shlex skips a comment with readline(), newline included; leave the newline, which ends a command."""

    def readline(self, size: int = -1) -> str:
        line = super().readline(size)
        if line.endswith("\n"):
            self.seek(self.tell() - 1)
            line = line[:-1]
        return line


def shell_words(text: str) -> list[str]:
    """Split POSIX shell text into words and operators (`&&`, `|`, `;`, newline, `>` ...)."""
    # `2>&1`, `1>log`: digits glued to a redirection are a file descriptor, not an argument
    text = re.sub(r"(^|\s)\d+(?=[<>])", r"\1", text)
    # a newline separates commands, as `;` does (a multi-line `sh -c` script)
    lexer = shlex.shlex(_KeepNewlines(text), posix=True, punctuation_chars="();<>|&\n")
    lexer.whitespace = " \t\r"
    lexer.whitespace_split = True
    return list(lexer)


def _is_operator(word: str) -> bool:
    return bool(word) and set(word) <= OPERATOR_CHARS


def _is_redirection(word: str) -> bool:
    return bool(word) and set(word) <= set("<>&") and ("<" in word or ">" in word)


def simple_commands(words: list[str]) -> Iterator[list[str]]:
    """The simple commands of a shell word list, without operators and redirections."""
    current: list[str] = []
    index = 0
    while index < len(words):
        word = words[index]
        if _is_operator(word):
            if current:
                yield current
            current = []
            index += 1
        elif _is_redirection(word):
            index += 2  # the operator and its target
        else:
            current.append(word)
            index += 1
    if current:
        yield current


def _unwrap(argv: list[str]) -> list[str]:
    """Drop leading VAR=value assignments and wrappers such as `exec`, `flock -n LOCK`, `timeout 6h`."""
    argv = list(argv)
    while argv:
        if ASSIGNMENT.match(argv[0]):
            argv = argv[1:]
            continue
        wrapper = WRAPPERS.get(os.path.basename(argv[0]))
        if wrapper is None:
            return argv
        takes_value, positionals = wrapper
        argv = argv[1:]
        while argv and argv[0].startswith("-") and argv[0] != "--":
            argv = argv[2:] if argv[0] in takes_value else argv[1:]
        if argv and argv[0] == "--":
            argv = argv[1:]
        argv = argv[positionals:]
    return argv


def commands_in_argv(argv: list[str]) -> list[list[str]]:
    """camjobs invocations in an exec-style argument vector (container command, ExecStart)."""
    argv = _unwrap(argv)
    if not argv:
        return []
    program = os.path.basename(argv[0])
    if program in SHELLS:
        for position, word in enumerate(argv[1:-1], start=1):
            if re.fullmatch(r"-[a-z]*c[a-z]*", word):
                return commands_in_shell(argv[position + 1])
        return []
    if program == "camjobs":
        return [["camjobs", *argv[1:]]]
    if program == "trap" and len(argv) >= 3:  # `trap 'COMMANDS' SIGNAL...` runs COMMANDS on the signal
        return commands_in_shell(argv[1])
    if re.fullmatch(r"python[\d.]*", program) and argv[1:3] == ["-m", "camjobs"]:
        return [["camjobs", *argv[3:]]]
    if program == "ray" and argv[1:3] == ["job", "submit"] and "--" in argv:
        return commands_in_argv(argv[argv.index("--") + 1 :])
    return []


def commands_in_shell(text: str) -> list[list[str]]:
    """camjobs invocations in a shell command line (RayJob entrypoint, crontab, launcher commands)."""
    found = []
    for command in simple_commands(shell_words(text)):
        found.extend(commands_in_argv(command))
    return found


@dataclass(frozen=True)
class Found:
    file: Path
    where: str
    argv: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{_shown(self.file)}:{self.where}"


@dataclass(frozen=True)
class Mention:
    """Text that names a camjobs subcommand but from which no command line was extracted."""

    file: Path
    where: str
    text: str


def _yaml_strings(node: Any, where: str) -> Iterator[tuple[str, str, list[list[str]]]]:
    """(where, text, commands) for every command-bearing string or container in a YAML tree."""
    if isinstance(node, dict):
        is_container = "image" in node and ("command" in node or "args" in node)
        if is_container:
            argv = [str(a) for a in (node.get("command") or []) + (node.get("args") or [])]
            yield f"{where}.command+args", " ".join(argv), commands_in_argv(argv)
        for key, value in node.items():
            if is_container and key in ("command", "args"):
                continue
            yield from _yaml_strings(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _yaml_strings(value, f"{where}[{index}]")
    # a single word (metadata.name: camjobs, serviceAccountName, a claim name) is no command
    elif isinstance(node, str) and "camjobs" in node and len(node.split()) >= 2:
        yield where, node, commands_in_shell(node)


def _comment_commands(path: Path) -> Iterator[tuple[str, str, list[list[str]]]]:
    """Commented examples such as `#   camjobs run --config ...` in YAML, unit and crontab files.

    A comment line that starts with `camjobs <subcommand>` (or `ray job submit ... -- `) is
    taken as a command example and checked; prose that names a command quotes it in backticks.
    """
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        match = COMMENTED_COMMAND.match(line)
        if match:
            yield f"line {number} (comment)", match["cmd"], commands_in_shell(match["cmd"])


def _systemd_commands(path: Path) -> Iterator[tuple[str, str, list[list[str]]]]:
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        match = re.match(r"^\s*(Exec\w*)\s*=\s*(.*)$", line)
        if match:
            value = match[2].lstrip("-@:+!")  # systemd's prefixes (ignore failure, ...)
            # systemd does not run a shell: the line is an argument vector
            yield f"line {number} ({match[1]})", value, commands_in_argv(shlex.split(value))


def _crontab_commands(path: Path) -> Iterator[tuple[str, str, list[list[str]]]]:
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or ASSIGNMENT.match(stripped.replace(" ", "")):
            continue
        fields = stripped.split(None, 1 if stripped.startswith("@") else 5)
        command = fields[-1]
        yield f"line {number}", command, commands_in_shell(command)


def _readme_commands() -> Iterator[tuple[str, str, list[list[str]]]]:
    """Commands in the code blocks of the README's deployment sections."""
    section, in_code, pending, start = None, False, "", 0
    for number, line in enumerate(README.read_text().splitlines(), start=1):
        if line.startswith("## "):
            section = line[3:].strip()
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        if not in_code or section not in README_SECTIONS:
            continue
        text = re.sub(r"^\s*\$\s+", "", line) if not pending else line
        if not pending:
            start = number
        if text.rstrip().endswith("\\"):
            pending += text.rstrip()[:-1] + " "
            continue
        text, pending = pending + text, ""
        if "camjobs" in text and not text.lstrip().startswith("#"):
            yield f"README {section!r} line {start}", text, commands_in_shell(text)


def _entries(path: Path) -> Iterator[tuple[str, str, list[list[str]]]]:
    if path.suffix in (".yaml", ".yml"):
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            yield from _yaml_strings(document, f"doc{index}")
    elif path.suffix in (".service", ".timer"):
        yield from _systemd_commands(path)
    elif path.suffix == ".crontab":
        yield from _crontab_commands(path)
    if path.suffix in (".yaml", ".yml", ".service", ".timer", ".crontab"):
        yield from _comment_commands(path)


def scanned_files() -> list[Path]:
    files = [
        p
        for p in sorted(DEPLOY.rglob("*"))
        if p.is_file() and p.suffix in (".yaml", ".yml", ".service", ".timer", ".crontab")
    ]
    return files + sorted(CONFIGS.glob("*.yaml"))


def collect(paths: list[Path] | None = None, readme: bool = True) -> tuple[list[Found], list[Mention]]:
    found: list[Found] = []
    mentions: list[Mention] = []
    sources = [(path, _entries(path)) for path in (paths if paths is not None else scanned_files())]
    if readme and README.exists():
        sources.append((README, _readme_commands()))
    for path, entries in sources:
        for where, text, commands in entries:
            for index, argv in enumerate(commands):
                suffix = f"#{index}" if len(commands) > 1 else ""
                found.append(Found(path, where + suffix, tuple(argv)))
            if not commands and MENTION.search(text):
                mentions.append(Mention(path, where, text))
    return found, mentions


# --------------------------------------------------------------------------------------------
# Checking a command line with the CLI's own parser
# --------------------------------------------------------------------------------------------

RUN_CONFIG_FIELDS = set(RunConfig.__dataclass_fields__)


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _is_click_error(exc: BaseException, name: str) -> bool:
    # typer vendors click (typer._click) in some versions: match by class name, not identity
    return any(cls.__name__ == name for cls in type(exc).__mro__)


def config_in_repo(path: str) -> Path | None:
    """The repository file a --config path in a manifest refers to.

    Relative paths are relative to the checkout; absolute ones name a copy of configs/ (the
    image's /home/ray/configs, a launcher node's /home/ray/camjobs/configs).
    """
    pure = PurePosixPath(path)
    if not pure.is_absolute():
        return REPO / pure
    if pure.parent.name == "configs":
        return CONFIGS / pure.name
    return Path(path)  # e.g. a test's temporary file


@dataclass
class Checked:
    subcommand: str
    params: dict
    config_file: Path | None
    run_config: RunConfig | None


def check_command(argv: list[str] | tuple[str, ...], where: str = "command") -> Checked:
    """Parse `camjobs ...` with the CLI's own parser, as `camjobs` would, without running it.

    Fails (AssertionError naming `where`) on an unknown subcommand or option, a bad option
    value, a --config that is not in configs/, or a config + flags combination that
    RunConfig rejects.
    """
    argv = list(argv)
    shown = shlex.join(argv)
    assert argv and os.path.basename(argv[0]) == "camjobs", f"{where}: not a camjobs command: {shown}"
    group = typer.main.get_command(app)
    assert len(argv) > 1, f"{where}: `camjobs` without a subcommand"
    name, args = argv[1], argv[2:]
    command = group.commands.get(name)
    assert command is not None, (
        f"{where}: `{shown}` uses `camjobs {name}`, which the CLI does not have "
        f"(it has: {', '.join(sorted(group.commands))})"
    )
    config_file = None
    for index, arg in enumerate(args):
        if arg == "--config" or arg.startswith("--config="):
            value = arg.split("=", 1)[1] if "=" in arg else (args[index + 1] if index + 1 < len(args) else "")
            config_file = config_in_repo(value)
            assert config_file.is_file(), f"{where}: `{shown}` names --config {value}, which is not a file in configs/"
            if "=" in arg:
                args[index] = f"--config={config_file}"
            else:
                args[index + 1] = str(config_file)
            break
    try:
        context = command.make_context(f"camjobs {name}", args)
    except Exception as exc:
        if _is_click_error(exc, "UsageError"):
            raise AssertionError(f"{where}: the CLI rejects `{shown}`: {exc.format_message()}") from None
        if _is_click_error(exc, "Exit"):
            raise AssertionError(f"{where}: `{shown}` only prints help or exits early") from None
        raise
    params = dict(context.params)
    run_config = None
    if "config" in params or name == "run":
        flags = {k: v for k, v in params.items() if k in RUN_CONFIG_FIELDS and (name == "run" or k != "address")}
        try:
            config = params.get("config")
            run_config = load_run_config(Path(config) if config is not None else None, flags)
        except (ConfigError, yaml.YAMLError) as exc:
            raise AssertionError(f"{where}: `{shown}` gives an invalid job config: {exc}") from None
    return Checked(name, params, config_file, run_config)


# --------------------------------------------------------------------------------------------
# The command lines
# --------------------------------------------------------------------------------------------

FOUND, MENTIONS = collect()


@pytest.mark.parametrize("found", FOUND, ids=[f.id for f in FOUND])
def test_every_camjobs_command_line_parses_with_the_cli(found):
    check_command(found.argv, found.id)


def test_commands_were_found_in_every_file_that_runs_camjobs():
    for path in RUNS_CAMJOBS:
        assert path.is_file(), f"{path.relative_to(REPO)} is missing"
        assert [f for f in FOUND if f.file == path and "comment" not in f.where], (
            f"no camjobs command line found in {path.relative_to(REPO)}"
        )
    assert any(f.file == README for f in FOUND), f"no camjobs command in the README sections {README_SECTIONS}"


def test_no_camjobs_mention_escapes_the_checker():
    # a string that names a camjobs subcommand but yields no command line would not be checked
    assert not MENTIONS, "camjobs commands the checker could not extract:\n" + "\n".join(
        f"  {_shown(m.file)}:{m.where}: {m.text}" for m in MENTIONS
    )


@pytest.mark.parametrize("path", NIGHTLY, ids=[p.name for p in NIGHTLY])
def test_nightly_schedulers_run_the_nightly_config_incrementally(path):
    # the commands that start the job (not e.g. the `camjobs stop` of a signal trap)
    commands = [f for f in FOUND if f.file == path and "comment" not in f.where and f.argv[1] in ("run", "submit")]
    assert commands
    for found in commands:
        checked = check_command(found.argv, found.id)
        assert checked.config_file is not None and checked.config_file.name == "nightly.yaml", found.id
        assert checked.params.get("incremental") is True, f"{found.id}: not --incremental"
        assert checked.run_config is not None and checked.run_config.incremental


def test_the_rayjob_runs_the_ham10000_config():
    (found,) = [f for f in FOUND if f.file == RAYJOB and f.where.endswith("entrypoint")]
    checked = check_command(found.argv, found.id)
    assert checked.subcommand == "run" and checked.config_file == CONFIGS / "ham10000.yaml"


def test_k8s_config_paths_are_where_the_image_has_the_configs():
    configs_in_image = dockerfile_copy_destination("configs")
    for found in FOUND:
        if found.file.parent != K8S:
            continue
        args = list(found.argv)
        for index, arg in enumerate(args):
            if arg == "--config":
                path = PurePosixPath(args[index + 1])
                assert path.is_absolute() and str(path.parent) == configs_in_image, (
                    f"{found.id}: --config {path} is not in the image's {configs_in_image}/"
                )


# --- the checker itself catches drift ---------------------------------------------------------


def test_checker_rejects_an_option_the_cli_does_not_have():
    with pytest.raises(AssertionError, match="--bogus-option"):
        check_command(["camjobs", "run", "--config", "configs/cpu-smoke.yaml", "--bogus-option", "1"])


def test_checker_rejects_a_subcommand_the_cli_does_not_have():
    with pytest.raises(AssertionError, match="camjobs frobnicate"):
        check_command(["camjobs", "frobnicate", "--config", "configs/nightly.yaml"])


def test_checker_rejects_bad_values_missing_configs_and_bad_config_keys(tmp_path):
    with pytest.raises(AssertionError, match="actors"):
        check_command(["camjobs", "run", "--config", "configs/cpu-smoke.yaml", "--actors", "two"])
    with pytest.raises(AssertionError, match="not a file in configs"):
        check_command(["camjobs", "run", "--config", "/home/ray/configs/no-such-config.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: d\noutput: o\ncheckpoint: c.pt\nbatchsize: 4\n")
    with pytest.raises(AssertionError, match="batchsize"):
        check_command(["camjobs", "run", "--config", str(bad)])
    with pytest.raises(AssertionError, match="method"):
        check_command(["camjobs", "run", "--config", "configs/cpu-smoke.yaml", "--method", "lime"])


def test_checker_finds_a_bogus_option_in_a_manifest(tmp_path):
    manifest = tmp_path / "rayjob.yaml"
    manifest.write_text(
        "apiVersion: ray.io/v1\nkind: RayJob\nmetadata: {name: x}\n"
        "spec:\n  entrypoint: camjobs run --config /home/ray/configs/ham10000.yaml --gpus 2\n"
    )
    unit = tmp_path / "x.service"
    unit.write_text(
        "[Service]\nExecStart=/opt/camjobs/.venv/bin/camjobs run --config configs/nightly.yaml --incremntal\n"
    )
    found, mentions = collect([manifest, unit], readme=False)
    assert [f.argv[:2] for f in found] == [("camjobs", "run"), ("camjobs", "run")] and not mentions
    for item in found:
        with pytest.raises(AssertionError, match="No such option"):
            check_command(item.argv, item.id)


@pytest.mark.parametrize(
    "line, expected",
    [
        ("camjobs run --config c.yaml", [["camjobs", "run", "--config", "c.yaml"]]),
        (
            "cd /opt/camjobs && flock -n /tmp/l .venv/bin/camjobs run --actors 2 >> /var/log/x 2>&1",
            [["camjobs", "run", "--actors", "2"]],
        ),
        ("bash -lc 'set -e; exec camjobs submit --wait'", [["camjobs", "submit", "--wait"]]),
        ("ray job submit --address http://h:8265 -- camjobs run --incremental", [["camjobs", "run", "--incremental"]]),
        ("PYTHONUNBUFFERED=1 timeout 6h python3 -m camjobs run -v", [["camjobs", "run", "-v"]]),
        ("pip install /home/ray/camjobs && camjobs demo", [["camjobs", "demo"]]),
        ("pip install /home/ray/camjobs", []),
        # a multi-line script: newlines end commands, a trap's commands are commands too
        (
            "trap 'kill $!; camjobs stop \"$ID\"; exit 143' TERM\ncamjobs submit --wait &\nwait $!\n",
            [["camjobs", "stop", "$ID"], ["camjobs", "submit", "--wait"]],
        ),
        ("echo start  # a comment\ncamjobs demo", [["camjobs", "demo"]]),
    ],
)
def test_command_extraction(line, expected):
    assert commands_in_shell(line) == expected


# --------------------------------------------------------------------------------------------
# The manifests' own structure
# --------------------------------------------------------------------------------------------


def load_documents(path: Path) -> list[dict]:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert documents and all(isinstance(d, dict) for d in documents), f"{path.relative_to(REPO)}: not YAML mappings"
    return documents


def one(path: Path, kind: str) -> dict:
    matches = [d for d in load_documents(path) if d.get("kind") == kind]
    assert len(matches) == 1, f"{path.relative_to(REPO)}: expected one {kind}, found {len(matches)}"
    return matches[0]


def containers(pod_template: dict, where: str) -> list[dict]:
    items = (
        pod_template["template"]["spec"]["containers"]
        if "template" in pod_template
        else pod_template["spec"]["containers"]
    )
    assert items, f"{where}: no containers"
    for container in items:
        assert container.get("name") and container.get("image"), f"{where}: a container without name or image"
    return items


def check_cron(schedule: str, where: str) -> None:
    fields = schedule.split()
    assert len(fields) == 5 and all(CRON_FIELD.match(f) for f in fields), (
        f"{where}: {schedule!r} is not a 5-field cron schedule"
    )


def check_ray_cluster_spec(spec: dict, where: str, *, gpu: bool = True) -> list[dict]:
    """The RayClusterSpec fields KubeRay requires, and what camjobs needs of them."""
    assert spec.get("rayVersion") == ray.__version__, (
        f"{where}: rayVersion {spec.get('rayVersion')} != installed Ray {ray.__version__}"
    )
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: Ray token auth is not on"
    head = spec["headGroupSpec"]
    assert isinstance(head.get("rayStartParams", {}), dict)
    all_containers = containers(head, f"{where}.headGroupSpec")
    assert any(p.get("containerPort") == 8265 for c in all_containers for p in c.get("ports", [])), (
        f"{where}: head without dashboard port"
    )
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no workerGroupSpecs"
    gpu_containers = []
    for group in groups:
        assert group.get("groupName"), f"{where}: worker group without groupName"
        assert group.get("minReplicas", 0) <= group.get("replicas", 0) <= group.get("maxReplicas", 2**31)
        for container in containers(group, f"{where}.workerGroupSpecs[{group['groupName']}]"):
            all_containers.append(container)
            if "nvidia.com/gpu" in container.get("resources", {}).get("limits", {}):
                gpu_containers.append(container)
    if gpu:
        assert gpu_containers, f"{where}: no worker container with an nvidia.com/gpu limit"
        for container in gpu_containers:
            assert container["image"].endswith("-gpu"), (
                f"{where}: GPU container runs the non-GPU image {container['image']}"
            )
    for container in all_containers:
        assert container["image"].startswith("registry.example.com/camjobs:"), (
            f"{where}: {container['image']} is not the camjobs image"
        )
    return all_containers


# KubeRay's RayJob clean-up in rules mode, spec.deletionStrategy.deletionRules, as KubeRay 1.6's RayJob CRD
# and its controller's validation define it (ray-operator/apis/ray/v1/rayjob_types.go,
# controllers/ray/utils/validation.go). Policies in the order in which the controller requires
# non-decreasing TTLs for one jobStatus.
DELETION_POLICIES = ("DeleteWorkers", "DeleteCluster", "DeleteSelf", "DeleteNone")
# condition.jobStatus's enum: a rule never matches a STOPPED job, nor one that KubeRay failed for its
# activeDeadlineSeconds (jobStatus stays RUNNING) or before it ran
RULE_JOB_STATUSES = ("SUCCEEDED", "FAILED")
TIMEOUT_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def check_deletion_rules(spec: dict, where: str) -> dict[tuple[str, str], int]:
    """{(jobStatus, policy): ttlSeconds} of a RayJob spec's deletion rules, which must be valid in KubeRay 1.6."""
    strategy = spec["deletionStrategy"]
    # legacy onSuccess/onFailure are deprecated and may not be mixed with deletionRules
    assert set(strategy) == {"deletionRules"}, f"{where}.deletionStrategy: {sorted(strategy)}"
    rules = strategy["deletionRules"]
    assert isinstance(rules, list) and rules, f"{where}: deletionRules must be a non-empty list"
    found: dict[tuple[str, str], int] = {}
    for index, rule in enumerate(rules):
        at = f"{where}.deletionStrategy.deletionRules[{index}]"
        assert set(rule) == {"policy", "condition"}, f"{at}: {sorted(rule)}"
        assert rule["policy"] in DELETION_POLICIES, f"{at}: policy {rule['policy']!r}"
        condition = rule["condition"]
        assert "jobStatus" in condition and set(condition) <= {"jobStatus", "ttlSeconds"}, (
            f"{at}: condition {condition} (KubeRay 1.6 knows jobStatus, ttlSeconds)"
        )
        assert condition["jobStatus"] in RULE_JOB_STATUSES, f"{at}: jobStatus {condition['jobStatus']!r}"
        ttl = condition.get("ttlSeconds", 0)
        assert isinstance(ttl, int) and ttl >= 0, f"{at}: ttlSeconds {ttl!r}"
        key = (condition["jobStatus"], rule["policy"])
        assert key not in found, f"{at}: a second {key[1]} rule for {key[0]}"
        found[key] = ttl
    for status in RULE_JOB_STATUSES:
        ttls = [found[status, policy] for policy in DELETION_POLICIES[:3] if (status, policy) in found]
        assert ttls == sorted(ttls), (
            f"{where}: for {status} KubeRay needs DeleteWorkers <= DeleteCluster <= DeleteSelf TTLs"
        )
    # the controller refuses rules next to shutdownAfterJobFinishes, and a TTL without it
    assert not spec.get("shutdownAfterJobFinishes"), f"{where}: shutdownAfterJobFinishes with deletionRules"
    assert not spec.get("ttlSecondsAfterFinished"), f"{where}: ttlSecondsAfterFinished without shutdownAfterJobFinishes"
    if spec.get("rayClusterSpec", {}).get("enableInTreeAutoscaling"):
        assert all(policy != "DeleteWorkers" for _, policy in found), f"{where}: DeleteWorkers with autoscaling"
    return found


def timeout_limit(command: str) -> float | None:
    """Seconds after which coreutils `timeout` has killed the command line's first command, else None."""
    argv = next(simple_commands(shell_words(command)), [])
    if not argv or argv[0] != "timeout":
        return None
    kill_after, words = 0.0, argv[1:]
    while words and words[0].startswith("-"):
        option, _, value = words[0].partition("=")
        takes_value = option in ("-k", "--kill-after", "-s", "--signal") and not value
        value = words[1] if takes_value else value
        if option in ("-k", "--kill-after"):
            kill_after = _duration(value)
        words = words[2:] if takes_value else words[1:]
    return _duration(words[0]) + kill_after


def _duration(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text)
    assert match, f"not a timeout duration: {text!r}"
    return float(match[1]) * TIMEOUT_UNITS[match[2]]


def check_rayjob_spec(spec: dict, where: str) -> None:
    assert isinstance(spec.get("entrypoint"), str) and "camjobs" in spec["entrypoint"], (
        f"{where}: no camjobs entrypoint"
    )
    deadline = spec.get("activeDeadlineSeconds")
    assert isinstance(deadline, int) and deadline > 0, f"{where}: activeDeadlineSeconds {deadline!r}"
    if "deletionStrategy" in spec:
        rules = check_deletion_rules(spec, where)
        for status in RULE_JOB_STATUSES:
            assert {(status, "DeleteCluster"), (status, "DeleteSelf")} & set(rules), (
                f"{where}: a {status} run's cluster is never deleted"
            )
        # no rule sees a run KubeRay failed for the deadline: the run must end by itself before it
        limit = timeout_limit(spec["entrypoint"])
        assert limit is not None and limit < deadline, (
            f"{where}: the entrypoint does not end under `timeout` before activeDeadlineSeconds ({deadline} s)"
        )
    else:
        assert spec.get("shutdownAfterJobFinishes") is True, f"{where}: the cluster would outlive the job"
        assert isinstance(spec.get("ttlSecondsAfterFinished"), int) and spec["ttlSecondsAfterFinished"] >= 0
    check_ray_cluster_spec(spec["rayClusterSpec"], f"{where}.rayClusterSpec")


def test_rayjob():
    job = one(RAYJOB, "RayJob")
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    check_rayjob_spec(job["spec"], "RayJob")


def test_raycronjob():
    cron = one(RAYCRONJOB, "RayCronJob")
    assert cron["apiVersion"] == "ray.io/v1" and cron["metadata"]["name"]
    spec = cron["spec"]
    check_cron(spec["schedule"], "RayCronJob.spec.schedule")
    # KubeRay 1.6's RayCronJobSpec: schedule, jobTemplate (a RayJobSpec), suspend; no more
    assert set(spec) <= {"schedule", "jobTemplate", "suspend"}, (
        f"fields KubeRay 1.6 does not know: {set(spec) - {'schedule', 'jobTemplate', 'suspend'}}"
    )
    template = spec["jobTemplate"]
    check_rayjob_spec(template, "RayCronJob.spec.jobTemplate")
    # one RayJob a night, with its submitter Job and pod: each is deleted in the end, whatever the outcome
    rules = check_deletion_rules(template, "RayCronJob.spec.jobTemplate")
    for status in RULE_JOB_STATUSES:
        assert (status, "DeleteSelf") in rules, f"a {status} night's RayJob is never deleted"
        assert rules.get((status, "DeleteCluster"), rules[status, "DeleteSelf"]) <= 6 * 3600, (
            f"a {status} night's GPU cluster is kept for the day"
        )
    # a RayCronJob has no concurrencyPolicy: the run's own time limit keeps a night from running into the next
    assert timeout_limit(template["entrypoint"]) < template["activeDeadlineSeconds"] < 24 * 3600


def _rules(template: dict) -> list[dict]:
    return template["deletionStrategy"]["deletionRules"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.update(shutdownAfterJobFinishes=True), "shutdownAfterJobFinishes with deletionRules"),
        (lambda s: s.update(ttlSecondsAfterFinished=600), "ttlSecondsAfterFinished without"),
        (lambda s: _rules(s)[0]["condition"].update(jobStatus="STOPPED"), "jobStatus 'STOPPED'"),
        (lambda s: _rules(s)[0]["condition"].update(jobDeploymentStatus="Failed"), "KubeRay 1.6 knows"),
        (lambda s: _rules(s)[0].update(policy="DeleteEverything"), "policy 'DeleteEverything'"),
        (lambda s: _rules(s).append(dict(_rules(s)[0])), "a second"),
        (lambda s: _rules(s)[0]["condition"].update(ttlSeconds=10**7), "DeleteCluster <= DeleteSelf"),
        (lambda s: s["deletionStrategy"].update(onSuccess={"policy": "DeleteSelf"}), "deletionStrategy"),
        (lambda s: s.update(deletionStrategy={"deletionRules": []}), "non-empty"),
        (lambda s: s.update(entrypoint=s["entrypoint"].split(" ", 3)[3]), "under `timeout`"),
        (lambda s: s.update(entrypoint=s["entrypoint"].replace(" 18h ", " 20h ")), "under `timeout`"),
        (lambda s: s.update(deletionStrategy={"deletionRules": _rules(s)[:1]}), "a FAILED run's cluster is never"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_checker_rejects_deletion_rules_kuberay_refuses_or_that_leak(change, message):
    template = copy.deepcopy(one(RAYCRONJOB, "RayCronJob")["spec"]["jobTemplate"])
    change(template)
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_rayjob_spec(template, "jobTemplate")


@pytest.mark.parametrize(
    "command, seconds",
    [
        ("timeout --kill-after=5m 18h camjobs run --config c.yaml", 18 * 3600 + 300),
        ("timeout -k 30 -s INT 2h camjobs run", 7230),
        ("timeout 90 camjobs run", 90),
        ("camjobs run --config c.yaml", None),
    ],
)
def test_timeout_limit(command, seconds):
    assert timeout_limit(command) == seconds


def readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


@pytest.mark.parametrize("where", ["manifest", "README"])
def test_the_feature_gates_and_how_to_check_them_are_documented(where):
    """Without the RayCronJob gate, `kubectl apply` succeeds and nothing ever runs: the docs must say so."""
    text = RAYCRONJOB.read_text() if where == "manifest" else readme_section("Running nightly")
    assert "alpha" in text.lower() and "`kubectl apply` succeeds" in text
    assert re.search(r"--feature-gates=RayCronJob=true\b", text)
    assert re.search(r"get deploy kuberay-operator -o yaml \| grep feature-gates", text)
    if "deletionStrategy" in one(RAYCRONJOB, "RayCronJob")["spec"]["jobTemplate"]:
        assert "RayJobDeletionPolicy=true" in text, "deletion rules need the RayJobDeletionPolicy gate"


# --- label selectors: a `kubectl get KIND -l SELECTOR` example must select what it shows ----------------


def _kubectl_get_lines() -> Iterator[tuple[str, str]]:
    """(where, line) of the `kubectl ... get` examples in deploy/ comments and the README's deployment sections."""
    section = None
    for number, line in enumerate(README.read_text().splitlines(), start=1):
        section = line[3:].strip() if line.startswith("## ") else section
        if section in README_SECTIONS and re.search(r"\bkubectl\b.*\sget\s", line):
            yield f"README:{number}", line.strip().strip("`")
    for path in sorted(K8S.glob("*.yaml")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.lstrip().startswith("#") and re.search(r"\bkubectl\b.*\sget\s", line):
                yield f"{path.name}:{number}", line.lstrip()[1:]


def label_selectors() -> list[tuple[str, str, str]]:
    """(where, resource, selector) of every `kubectl ... get RESOURCE ... -l SELECTOR` example."""
    found = []
    for where, line in _kubectl_get_lines():
        for argv in simple_commands(shell_words(line)):
            if argv[0] != "kubectl" or "get" not in argv:
                continue
            rest = argv[argv.index("get") + 1 :]
            resource = next(word for word in rest if not word.startswith("-"))
            for index, word in enumerate(rest):
                if word in ("-l", "--selector"):
                    found.append((where, resource, rest[index + 1]))
                elif word.startswith(("-l=", "--selector=")):
                    found.append((where, resource, word.split("=", 1)[1]))
    return found


def labels_of(resource: str) -> list[dict[str, str]]:
    """The labels of the objects of a kind that the manifests make, by Kubernetes' and KubeRay's documented rules."""
    kind = resource.split("/")[0].split(".")[0].lower().removesuffix("s")
    documents = [d for path in sorted(K8S.glob("*.yaml")) for d in load_documents(path)]
    own: dict[str, list[dict[str, str]]] = {}
    for document in documents:
        own.setdefault(document["kind"].lower(), []).append(document["metadata"].get("labels", {}))
    cronjobs = [d["spec"]["jobTemplate"] for d in documents if d["kind"] == "CronJob"]
    if kind == "rayjob":
        # a RayCronJob's RayJobs carry ray.io/cronjob-name=<its name> and none of its own labels
        made = [{"ray.io/cronjob-name": d["metadata"]["name"]} for d in documents if d["kind"] == "RayCronJob"]
        return own.get("rayjob", []) + made
    if kind == "job":  # a CronJob's Jobs carry its jobTemplate's labels
        return [template.get("metadata", {}).get("labels", {}) for template in cronjobs]
    if kind == "pod":  # and their pods the pod template's
        return [template["spec"]["template"].get("metadata", {}).get("labels", {}) for template in cronjobs]
    assert kind in own, f"no rule in this test for the labels of {resource}"
    return own[kind]


def selects(resource: str, selector: str) -> bool:
    pairs = selector.split(",")
    assert all(re.fullmatch(r"[\w./-]+=[\w.-]+", pair) for pair in pairs), f"not an equality selector: {selector}"
    wanted = dict(pair.split("=", 1) for pair in pairs)
    return any(wanted.items() <= labels.items() for labels in labels_of(resource))


def test_kubectl_label_selectors_select_what_the_manifests_make():
    found = label_selectors()
    for where, resource, selector in found:
        assert selects(resource, selector), f"{where}: `get {resource} -l {selector}` selects nothing"
    nightly = one(RAYCRONJOB, "RayCronJob")["metadata"]["name"]
    expected = ("rayjobs", f"ray.io/cronjob-name={nightly}")
    for source in (RAYCRONJOB.name, "README"):
        examples = {(resource, selector) for where, resource, selector in found if where.startswith(source)}
        assert expected in examples, f"{source}: no `kubectl get rayjobs -l ray.io/cronjob-name={nightly}`"
    # the RayCronJob's own labels are not on its RayJobs
    assert not selects("rayjobs", "app.kubernetes.io/component=nightly")


def test_long_lived_raycluster_uses_the_token_secret():
    cluster = one(RAYCLUSTER, "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    check_ray_cluster_spec(cluster["spec"], "RayCluster")
    assert cluster["spec"]["authOptions"].get("secretName")


def cronjob_pod() -> dict:
    return one(CRONJOB, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def test_cronjob_submits_to_the_long_lived_cluster_with_the_token_from_a_secret():
    cron = one(CRONJOB, "CronJob")
    assert cron["apiVersion"] == "batch/v1"
    spec = cron["spec"]
    check_cron(spec["schedule"], "CronJob.spec.schedule")
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = cronjob_pod()
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container.get("env", [])}
    cluster = one(RAYCLUSTER, "RayCluster")
    secret = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert secret == {"name": cluster["spec"]["authOptions"]["secretName"], "key": "auth_token"}
    # one address for both commands, from the environment
    assert env["RAY_API_SERVER_ADDRESS"]["value"] == f"http://{cluster['metadata']['name']}-head-svc:8265"
    commands = {
        argv[1]: check_command(argv, "CronJob") for argv in commands_in_argv(container["command"] + container["args"])
    }
    assert set(commands) == {"submit", "stop"}
    submit, stop = commands["submit"], commands["stop"]
    assert submit.params["wait"] and not submit.params.get("token") and not submit.params.get("address")
    assert not stop.params.get("token") and not stop.params.get("address")
    # the trap stops what was submitted: the same id, the pod's name, new every night (Ray refuses a reused id)
    assert submit.params["submission_id"] == stop.params["job_id"] == "$SUBMISSION_ID"
    assert env["SUBMISSION_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert pod.get("terminationGracePeriodSeconds", 30) >= 30, "too little time for `camjobs stop`"


# --- the CronJob's pod when Kubernetes kills it ---------------------------------------------------------

POD_NAME = "camjobs-nightly-submit-29430090-x7k9q"


def _stand_in_camjobs(bin_dir: Path, log: Path) -> None:
    """A `camjobs` that records its arguments; `submit` then follows for ten minutes, as during a long run.

    The CronJob's pod talks to a Ray cluster that cannot exist here; `camjobs submit`, `stop` and
    their HTTP calls meet a real head in tests/test_submit.py. What is tested here is the shell.
    """
    bin_dir.mkdir()
    script = bin_dir / "camjobs"
    script.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$*" >> {shlex.quote(str(log))}\n[ "$1" = submit ] && exec sleep 600\n'
    )
    script.chmod(0o755)


def _as_pid_1() -> list[str]:
    """`unshare` arguments that run a command as PID 1 of a new PID namespace, as in a container, if allowed."""
    command = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc"]
    try:
        allowed = subprocess.run([*command, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        allowed = False
    return command if allowed else []


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def run_pod_and_kill_it(script: str, tmp_path: Path, grace: float) -> tuple[int | None, list[str], bool]:
    """Run the pod's `sh -c SCRIPT`, SIGTERM its PID 1 once it submitted, wait `grace` seconds.

    Returns its exit code (None if it was still running), the stand-in's recorded calls, and
    whether any of its processes (the follower) outlived it.
    """
    log = tmp_path / "calls.log"
    _stand_in_camjobs(tmp_path / "bin", log)
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "SUBMISSION_ID": POD_NAME}
    prefix = _as_pid_1()
    pod = subprocess.Popen([*prefix, "/bin/sh", "-c", script], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (log.exists() and "submit" in log.read_text()):
            assert time.monotonic() < deadline and pod.poll() is None, "the pod never submitted"
            time.sleep(0.05)
        pid_1 = _children(pod.pid)[0] if prefix else pod.pid
        os.kill(pid_1, signal.SIGTERM)
        try:
            code = pod.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            code = None
        return code, log.read_text().splitlines(), code is not None and _group_alive(pod.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pod.pid, signal.SIGKILL)
        pod.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def pod_script() -> str:
    (container,) = cronjob_pod()["containers"]
    argv = container["command"] + container["args"]
    assert os.path.basename(argv[0]) in SHELLS and argv[1] == "-c", argv
    return argv[2]


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_killing_the_cronjob_pod_stops_the_ray_job_it_submitted(tmp_path):
    code, calls, left_behind = run_pod_and_kill_it(pod_script(), tmp_path, grace=20)
    assert code == 128 + signal.SIGTERM, f"exit {code}"
    assert not left_behind, "the follower outlived the pod's PID 1"
    submitted, stopped = calls
    assert submitted.startswith(f"submit --wait --submission-id {POD_NAME} ")
    assert stopped == f"stop {POD_NAME}"


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_the_kill_test_fails_for_a_follower_in_the_foreground(tmp_path):
    # a trap waits for the foreground command to end: without `&` + `wait`, nothing is stopped
    script = pod_script()
    foreground = re.sub(r" &\n", "\n", script).replace("wait $!\n", "")
    assert foreground != script
    code, calls, _ = run_pod_and_kill_it(foreground, tmp_path, grace=3)
    assert code is None and len(calls) == 1 and calls[0].startswith("submit ")


def test_pods_use_only_volumes_and_accounts_that_exist():
    prerequisites = load_documents(PREREQUISITES)
    claims = {d["metadata"]["name"] for d in prerequisites if d["kind"] == "PersistentVolumeClaim"}
    accounts = {d["metadata"]["name"] for d in prerequisites if d["kind"] == "ServiceAccount"}

    def walk(node, where):
        if isinstance(node, dict):
            if "containers" in node:  # a pod spec
                volumes = {v["name"] for v in node.get("volumes", [])}
                for container in node["containers"]:
                    for mount in container.get("volumeMounts", []):
                        assert mount["name"] in volumes, f"{where}: mount of undefined volume {mount['name']}"
                if "serviceAccountName" in node:
                    assert node["serviceAccountName"] in accounts, (
                        f"{where}: no ServiceAccount {node['serviceAccountName']}"
                    )
            if "persistentVolumeClaim" in node:
                assert node["persistentVolumeClaim"]["claimName"] in claims, (
                    f"{where}: no PVC {node['persistentVolumeClaim']}"
                )
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{where}[{index}]")

    for path in (RAYJOB, RAYCRONJOB, RAYCLUSTER, CRONJOB):
        for document in load_documents(path):
            walk(document, f"{path.name}:{document['kind']}")


def test_every_yaml_file_in_deploy_parses():
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 6
    for path in files:
        load_documents(path)


def test_cluster_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER.read_text())
    assert config["cluster_name"] and config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]
    validate_config(prepare_config(config))  # what `ray up` does before it starts anything
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers), "no GPU worker type"
    assert any(t.get("min_workers", 0) >= 1 for t in workers), "GPU workers must be up when camjobs starts"
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "/home/ray/camjobs" in setup, "setup_commands do not install camjobs"
    assert config["file_mounts"]["/home/ray/camjobs"] == "."
    # token auth: on for every node, and every node has the same token at Ray's default path
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert "/home/ray/.ray/auth_token" in config["file_mounts"]


def test_systemd_units():
    service = SERVICE.read_text()
    assert re.search(r"^Type=oneshot$", service, re.M), "a oneshot service cannot overlap itself"
    assert re.search(r"^WorkingDirectory=/", service, re.M)
    timer = TIMER.read_text()
    assert re.search(r"^OnCalendar=", timer, re.M) and re.search(r"^Persistent=true$", timer, re.M)
    assert re.search(rf"^Unit={re.escape(SERVICE.name)}$", timer, re.M)
    assert "WantedBy=timers.target" in timer


def test_crontab_line_is_a_valid_schedule_without_percent_signs():
    lines = [
        line
        for line in CRONTAB.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#") and not ASSIGNMENT.match(line.strip())
    ]
    assert lines
    for line in lines:
        fields = line.split(None, 5)
        check_cron(" ".join(fields[:5]), f"{CRONTAB.name}: {line}")
        assert "%" not in fields[5], "cron turns % into a newline"
        assert "flock -n" in fields[5], "nothing keeps two runs from overlapping"


# --------------------------------------------------------------------------------------------
# The container
# --------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile_base_image(build_args: dict[str, str] | None = None) -> str:
    """The FROM image with the ARG defaults (and build_args) substituted, as docker build does."""
    values: dict[str, str] = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            values[name] = default.strip('"')
        elif keyword == "FROM":
            values.update(build_args or {})
            return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m[1] or m[2]], rest.split()[0])
    raise AssertionError("Dockerfile has no FROM")


def dockerfile_copy_destination(source: str) -> str:
    for keyword, rest in dockerfile_instructions():
        if keyword == "COPY":
            words = [w for w in rest.split() if not w.startswith("--")]
            if source in (w.rstrip("/") for w in words[:-1]):
                return words[-1].rstrip("/")
    raise AssertionError(f"the Dockerfile does not COPY {source}")


def test_dockerfile_builds_on_rays_image_of_the_installed_ray_version():
    base = dockerfile_base_image()
    assert base.startswith("rayproject/ray:"), base
    tag = base.split(":", 1)[1]
    assert tag.startswith(ray.__version__ + "-"), f"FROM {base} is not Ray {ray.__version__}"
    assert tag == f"{ray.__version__}-py311-cpu", "the default build is the CPU image"
    assert dockerfile_base_image({"RAY_VARIANT": "gpu"}) == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert re.search(r'"ray\[data\]==\$\{RAY_VERSION\}"', DOCKERFILE.read_text()), "pip may replace the image's Ray"


def test_dockerfile_has_no_entrypoint_and_installs_camjobs_with_its_configs():
    instructions = dockerfile_instructions()
    entrypoints = [rest for keyword, rest in instructions if keyword == "ENTRYPOINT"]
    assert entrypoints in ([], ["[]"]), "KubeRay must be able to run its own commands"
    assert any(
        keyword == "RUN" and "pip install" in rest and "/tmp/camjobs-src" in rest for keyword, rest in instructions
    )
    assert dockerfile_copy_destination("configs") == "/home/ray/configs"


def test_dockerignore_lets_in_exactly_what_the_dockerfile_copies():
    rules = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", "the .dockerignore is an allow-list"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = set()
    for keyword, rest in dockerfile_instructions():
        if keyword == "COPY":
            words = [w for w in rest.split() if not w.startswith("--")]
            copied.update(w.rstrip("/") for w in words[:-1])
    assert copied <= allowed, f"COPY sources the build context would not have: {copied - allowed}"
    for path in copied:
        assert (REPO / path).exists(), path


def test_ray_version_is_the_same_everywhere():
    """Head, workers, the driver and the client must all run the installed Ray version."""
    version = re.escape(ray.__version__)
    patterns = [
        r"rayproject/ray:(\d+\.\d+\.\d+)",
        r"ray(?:\[[\w,]+\])?==(\d+\.\d+\.\d+)",
        r"rayVersion:\s*[\"']?(\d+\.\d+\.\d+)",
        r"camjobs:[\w.-]*-ray(\d+\.\d+\.\d+)",
        r"ARG RAY_VERSION=(\d+\.\d+\.\d+)",
    ]
    seen = 0
    for path in [DOCKERFILE, *sorted(p for p in DEPLOY.rglob("*") if p.is_file())]:
        text = path.read_text()
        for pattern in patterns:
            for match in re.finditer(pattern, text):
                seen += 1
                assert re.fullmatch(version, match[1]), (
                    f"{path.relative_to(REPO)}: {match[0]} but Ray is {ray.__version__}"
                )
    assert seen >= 10
