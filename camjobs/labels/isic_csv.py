"""Every class's probability in the ISIC challenge's CSV format.

``camjobs export --output DIR --format isic-csv --to predictions.csv``

The file is a classification submission as the ISIC challenges (2018 task 3, 2019, 2020) take it
and as their scorer, the ``isic-challenge-scoring`` package, reads it: a header ``image``, then one
column per class; one row per image; each class's probability as a decimal in [0, 1].

Which rows
    The newest row per image_id of DIR/cams, as the other exports choose (camjobs.output).
``image``
    The row's image_id: for the ISIC and HAM10000 layouts the image file's stem
    (``ISIC_0014628``), which is how the challenges name images.
Class columns
    The model's class names as they are, in the model's order (``model.classes`` in the run
    summary, DIR/runs/<run_id>.json); the values are the row's ``probs``. The scorer matches columns
    to its ground truth by name, so a model scored against a challenge's ground truth must have
    been trained with the challenge's class names (MEL, NV, BCC, ...).
Values
    The float32 probabilities in positional notation, with the fewest digits that read back as
    the same float32, and always a decimal point: a column of "0" and "1" would read as
    integers, which the scorer rejects.
Refused (exit 2)
    Rows without ``probs`` (written before schema version 3), rows whose run has no summary (its
    class order is unknown), and rows of models with different classes (one table has one set
    of columns).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from camjobs.labels.export import ExportError, ExportResult, _write_text
from camjobs.output import NoResults, read_newest_cams, read_run_summaries
from camjobs.storage import open_filesystem

FORMAT = "isic-csv"
IMAGE_COLUMN = "image"
SHOWN = 5  # image ids or runs named in an error message


class IsicCsvResult(ExportResult):
    """An isic-csv export: images and classes, no boxes."""

    def message(self) -> str:
        return f"{self.format}: {self.images} images, classes {', '.join(self.categories)} -> {self.paths[0]}"


def decimal(value: float) -> str:
    """A probability as the shortest positional decimal that reads back as the same float32."""
    return np.format_float_positional(np.float32(value), unique=True, trim="0")


def _shown(items: Sequence[str]) -> str:
    return ", ".join(items[:SHOWN]) + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def run_classes(output: str, run_ids: Sequence[str]) -> list[str]:
    """The class order shared by the models of these runs (their summaries' model.classes)."""
    summaries, missing = read_run_summaries(output, run_ids)
    if missing:
        run_id, why = next(iter(sorted(missing.items())))
        raise ExportError(
            f"run {run_id} has no readable run summary ({why}): the order of its model's classes is unknown"
        )
    by_classes: dict[tuple[str, ...], list[str]] = {}
    for run_id, summary in sorted(summaries.items()):
        classes = tuple(str(name) for name in summary.get("model", {}).get("classes") or ())
        by_classes.setdefault(classes, []).append(run_id)
    if len(by_classes) > 1:
        listed = "; ".join(f"run(s) {_shown(runs)}: {', '.join(classes)}" for classes, runs in by_classes.items())
        raise ExportError(f"the newest rows per image come from models with different classes ({listed})")
    classes = list(next(iter(by_classes)))
    if not classes or IMAGE_COLUMN in classes:
        raise ExportError(f"the model's classes {classes!r} cannot be columns beside {IMAGE_COLUMN!r}")
    return classes


def read_probabilities(output: str) -> tuple[list[str], pa.Table]:
    """The model's classes and the newest row per image (image_id, probs) of OUTPUT/cams."""
    try:
        table = read_newest_cams(output, ["probs"])
    except NoResults as exc:
        raise ExportError(str(exc)) from exc
    if table.num_rows == 0:
        raise ExportError(f"{output.rstrip('/')}/cams holds no rows: no probabilities to export")
    image_ids, probs = table["image_id"].to_pylist(), table["probs"].to_pylist()
    without = [image_id for image_id, values in zip(image_ids, probs) if not values]
    if without:
        raise ExportError(
            f"{len(without)} of {table.num_rows} images have no probs (rows written before schema "
            f"version 3): {_shown(without)}; run `camjobs run` on them again (an --incremental run counts "
            "them as done) and export again"
        )
    classes = run_classes(output, sorted(set(table["run_id"].to_pylist())))
    lengths = set(pc.list_value_length(table["probs"]).to_pylist())
    if lengths != {len(classes)}:
        raise ExportError(f"rows hold {sorted(lengths)} probabilities each, but the model has {len(classes)} classes")
    return classes, table


def isic_csv_text(classes: Sequence[str], table: pa.Table) -> str:
    """The CSV: header image + classes, then one row per image."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow([IMAGE_COLUMN, *classes])
    for image_id, probs in zip(table["image_id"].to_pylist(), table["probs"].to_pylist()):
        writer.writerow([image_id, *map(decimal, probs)])
    return text.getvalue()


def export_isic_csv(output: str, to: str) -> IsicCsvResult:
    """Write the newest row per image of OUTPUT/cams to the CSV file `to`."""
    classes, table = read_probabilities(output)
    fs, path = open_filesystem(to)
    _write_text(fs, path, isic_csv_text(classes, table))
    return IsicCsvResult(format=FORMAT, paths=[to], images=table.num_rows, boxes=0, dropped_boxes=0, categories=classes)
