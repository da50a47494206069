"""The results files (results-*.md): each keeps the latest round per script and machine; earlier
rounds move, verbatim, to the end of history/<the same file name> beside it.

A round's section carries an invisible marker line under its heading (round_marker) that names
its script, its kind and its machine; sections without one (written by hand) stay where they are.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from benchmarks.harness import machine_key


def round_marker(script: str, facts: Mapping, what: str = "") -> str:
    """The invisible line that names a round's script, kind and machine in a results file."""
    return f"<!-- round: {script}{' ' + what if what else ''} on {machine_key(facts)} -->"


def split_sections(text: str) -> tuple[str, list[str]]:
    """The text before the first '## ' heading, and each '## ' section (heading to the next one)."""
    parts = ("\n" + text).split("\n## ")
    return parts[0].removeprefix("\n"), ["## " + part for part in parts[1:]]


def history_path(path) -> Path:
    path = Path(path)
    return path.parent / "history" / path.name


def retire_rounds(path, marker: str) -> str:
    """Moves the sections of path that carry `marker` (earlier rounds of the same script on the same
    machine) to the end of history/<file name>; returns what is left of path's text."""
    path = Path(path)
    if not path.exists():
        return ""
    text = path.read_text()
    head, sections = split_sections(text)
    old = [s for s in sections if marker in s]
    if not old:
        return text
    history = history_path(path)
    history.parent.mkdir(parents=True, exist_ok=True)
    start = (
        ""
        if history.exists()
        else (
            f"# Older rounds of {path.name}\n\nMoved here verbatim when a newer round "
            "of the same script on the same machine replaced them; oldest first.\n\n"
        )
    )
    with open(history, "a") as file:
        file.write(start + "".join(s.rstrip("\n") + "\n\n" for s in old))
    kept = head + "".join(s.rstrip("\n") + "\n\n" for s in sections if marker not in s)
    atomic_write(path, kept)
    return kept


def with_marker(section: str, marker: str) -> str:
    """The section with the marker line under its heading."""
    heading, _, body = section.partition("\n")
    return heading + "\n" + marker + "\n" + body.rstrip("\n") + "\n"


def publish(path, section: str, marker: str, title: str) -> None:
    """Appends `section` to the results file at path (a new file starts with `title`), after moving
    the earlier rounds with the same marker to history/: the file keeps the latest round."""
    if not path:
        return
    kept = retire_rounds(path, marker) or f"# {title}\n"
    atomic_write(path, kept.rstrip("\n") + "\n\n" + with_marker(section, marker))
    print(f"written to {path}", file=sys.stderr)


def atomic_write(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
