"""Incremental runs: which images already have a row for this model and these settings.

The key of an image is its image_id and the sha256 of its bytes, so a changed file under
the same name is processed again. The settings are the output-affecting ones (model
fingerprint, method, threshold, target mode, input size, refinement): any change reprocesses all.
The existing keys are read once, with a column projection and a filter pushed down to
Parquet, so a run over 400k images makes no per-image round trip to the output.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from camjobs.storage import open_filesystem
from camjobs.schema import CAMS_SCHEMA, SETTINGS_ADDED, SETTINGS_COLUMNS


def item_key(image_id: str, content_sha256: str) -> str:
    return f"{image_id}\x00{content_sha256}"


def _matches(name: str, value: Any) -> pc.Expression:
    """column == value, where a null setting (no --refine; a version-1 row) matches a null."""
    if value is None:
        return pc.field(name).is_null()
    return pc.field(name) == pa.scalar(value, CAMS_SCHEMA.field(name).type)


def existing_keys(output: str, settings: dict[str, Any]) -> frozenset[str]:
    """Keys of the rows in OUTPUT/cams written with exactly these settings (a version-1 run
    summary's settings lack those added since, which then take their old meaning)."""
    settings = {**SETTINGS_ADDED, **settings}
    if set(settings) != set(SETTINGS_COLUMNS):
        raise ValueError(f"settings must give exactly {SETTINGS_COLUMNS}, got {sorted(settings)}")
    fs, root = open_filesystem(output.rstrip("/"))
    cams = f"{root}/cams"
    if fs.get_file_info(cams).type != pafs.FileType.Directory:
        return frozenset()
    dataset = pads.dataset(cams, filesystem=fs, format="parquet", schema=CAMS_SCHEMA)
    condition = functools.reduce(operator.and_, (_matches(name, settings[name]) for name in SETTINGS_COLUMNS))
    table = dataset.to_table(columns=["image_id", "content_sha256"], filter=condition)
    return frozenset(map(item_key, table["image_id"].to_pylist(), table["content_sha256"].to_pylist()))
