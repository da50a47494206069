"""A dataset's listing as Arrow data: one LISTING_SCHEMA row per input, built in record batches.

camjobs.layouts decides which files and CSV rows are inputs; this module holds what it builds: rows
gathered a few thousand at a time into record batches (never one Python object per image of the whole
dataset), image files' rows and their match with a CSV's rows on columns (file_rows, match_named), the
duplicate-id rule applied on columns, and the listing sorted by image_id. Tools that want
Python objects (training, the label tools, tests) iterate ``DatasetListing.records``; the run takes
``DatasetListing.table`` as it is. Plain pyarrow: no torch, no Ray.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from camjobs.schema import LISTING_SCHEMA

BATCH_ROWS = 8192
_BUILT = [f.name for f in LISTING_SCHEMA if f.name != "done_sha256"]  # what the listing itself fills in


@dataclass(frozen=True)
class ImageRecord:
    image_id: str
    source_path: str  # absolute local path, or "<scheme>://<path>" for remote file systems
    label: str | None = None
    mask_path: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    file_size: int | None = None  # the file's fingerprint, as the listing saw it
    file_mtime_ns: int | None = None
    file_etag: str | None = None


@dataclass(frozen=True)
class DatasetListing:
    layout: str
    root: str
    classes: list[str]
    table: pa.Table  # LISTING_SCHEMA, sorted by image_id, ids unique

    def __len__(self) -> int:
        return self.table.num_rows

    def iter_records(self) -> Iterator[ImageRecord]:
        names = [f.name for f in LISTING_SCHEMA if f.name != "done_sha256"]
        for batch in self.table.select(names).to_batches(BATCH_ROWS):
            yield from (ImageRecord(**row) for row in batch.to_pylist())

    @property
    def records(self) -> list[ImageRecord]:
        """Every row as an ImageRecord: for small datasets and tools that want objects, not for the run."""
        return list(self.iter_records())


class ListingBuilder:
    """Listing rows, gathered into LISTING_SCHEMA record batches of BATCH_ROWS."""

    def __init__(self) -> None:
        self.batches: list[pa.RecordBatch] = []
        self._columns: dict[str, list] = {name: [] for name in _BUILT}

    def add(
        self,
        image_id: str,
        source_path: str,
        label: str | None = None,
        mask_path: str | None = None,
        *,
        error_type: str | None = None,
        error_message: str | None = None,
        file_size: int | None = None,
        file_mtime_ns: int | None = None,
    ) -> None:
        row = (image_id, source_path, label, mask_path, error_type, error_message, file_size, file_mtime_ns, None)
        for column, value in zip(self._columns.values(), row):
            column.append(value)
        if len(self._columns["image_id"]) >= BATCH_ROWS:
            self._flush()

    def add_table(self, table: pa.Table) -> None:
        """Rows built on columns already (a folder's files): any LISTING_SCHEMA columns, the rest null."""
        self._flush()
        columns = [
            table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
            for f in LISTING_SCHEMA
        ]
        self.batches.extend(pa.Table.from_arrays(columns, schema=LISTING_SCHEMA).to_batches())

    def _flush(self) -> None:
        if not self._columns["image_id"]:
            return
        count = len(self._columns["image_id"])
        arrays = [pa.array(self._columns.get(f.name, [None] * count), f.type) for f in LISTING_SCHEMA]
        self.batches.append(pa.RecordBatch.from_arrays(arrays, schema=LISTING_SCHEMA))
        self._columns = {name: [] for name in _BUILT}

    def table(self) -> pa.Table:
        """Every row, ids made unique (unique_ids), sorted by image_id."""
        self._flush()
        table = pa.Table.from_batches(self.batches, schema=LISTING_SCHEMA)
        self.batches = []
        return unique_ids(table)


def unique_ids(table: pa.Table) -> pa.Table:
    """Keep the first row per image_id, by (image_id, no error first, source_path); rename later ones
    "<id>#2", "#3"... as duplicate_id errors (their own error kept), skipping names already taken.
    Sorted by image_id. Column operations, but for the few duplicates."""
    if table.num_rows == 0:
        return table
    keys = pa.table({"id": table["image_id"], "error": pc.is_valid(table["error_type"]), "path": table["source_path"]})
    table = table.take(
        pc.sort_indices(keys, sort_keys=[("id", "ascending"), ("error", "ascending"), ("path", "ascending")])
    )
    del keys
    ids = table["image_id"].combine_chunks()
    repeat = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    duplicate = pa.concat_arrays([pa.array([False]), repeat.fill_null(False)])
    if not pc.any(duplicate).as_py():
        return table  # sorted by image_id already
    table = _rename_duplicates(table, ids, duplicate)
    return table.take(pc.sort_indices(table, sort_keys=[("image_id", "ascending")]))


def _rename_duplicates(table: pa.Table, ids: pa.Array, duplicate: pa.BooleanArray) -> pa.Table:
    """The duplicate rows (sorted, each after its group's first row) renamed "<id>#n", n counting on within
    the group past names already taken; only these rows become Python values."""
    # Only an id with "#" in it can be a name a rename must step over.
    rows = pc.indices_nonzero(duplicate).to_pylist()
    taken = set(pc.filter(ids, pc.match_substring(ids, "#")).to_pylist())
    dup_ids = ids.take(rows).to_pylist()
    error_type = table["error_type"].take(rows).to_pylist()
    messages = table["error_message"].take(rows).to_pylist()
    firsts, count, previous = [], 1, None
    for i, (row, image_id) in enumerate(zip(rows, dup_ids)):
        same = image_id == previous and rows[i - 1] == row - 1
        count, first = (count + 1, firsts[-1]) if same else (2, row - 1)
        previous = image_id
        firsts.append(first)
        while f"{image_id}#{count}" in taken:
            count += 1
        taken.add(f"{image_id}#{count}")
        error_type[i] = error_type[i] or "duplicate_id"
        dup_ids[i] = f"{image_id}#{count}"
    first_paths = table["source_path"].take(firsts).to_pylist()
    old_ids = ids.take(rows).to_pylist()
    messages = [m or f"image_id {old!r} already used by {p}" for m, old, p in zip(messages, old_ids, first_paths)]
    for name, values in (("image_id", dup_ids), ("error_type", error_type), ("error_message", messages)):
        column = pc.replace_with_mask(table[name].combine_chunks(), duplicate, pa.array(values, pa.string()))
        table = table.set_column(table.schema.get_field_index(name), name, column)
    return table


def match_done(listing: pa.Table, done: pa.Table, *, rehash: bool = False) -> tuple[pa.Table, int]:
    """The listing against what an incremental run did before (camjobs.output.done_rows), on columns.

    Returns the pending rows, in listing order, and how many were skipped unopened: a row without a listing
    error whose image_id, file_size and file_mtime_ns equal a done row's (and file_etag, where both have
    one). Pending rows whose image has done rows carry their content hashes in done_sha256, for the
    decode stage to compare. rehash: no row is skipped unopened; every image with done rows is hashed."""
    rows = listing.append_column("_row", pa.array(range(listing.num_rows), pa.int64()))
    if done.num_rows == 0:
        return listing, 0
    if not rehash:
        unopened = np.zeros(rows.num_rows, dtype=bool)
        unopened[_same_fingerprint(rows.filter(pc.is_null(rows["error_type"])), done)] = True
        rows = rows.filter(pa.array(~unopened))
    done = done.filter(pc.is_in(done["image_id"], value_set=rows["image_id"]))  # only the pending images' hashes
    hashes = done.group_by("image_id").aggregate([("content_sha256", "distinct")])
    hashes = hashes.append_column("_done", pa.array(range(hashes.num_rows), pa.int64()))
    joined = rows.select(["_row", "image_id"]).join(hashes.select(["image_id", "_done"]), keys="image_id")
    joined = joined.take(pc.sort_indices(joined, sort_keys=[("_row", "ascending")]))
    done_sha256 = hashes["content_sha256_distinct"].take(joined["_done"])
    pending = rows.drop_columns(["_row", "done_sha256"]).append_column("done_sha256", done_sha256)
    return pending.select(LISTING_SCHEMA.names).cast(LISTING_SCHEMA), listing.num_rows - rows.num_rows


def _same_fingerprint(candidates: pa.Table, done: pa.Table) -> np.ndarray:
    """The _row of each candidate with a done row of the same image_id and fingerprint. Each candidate is
    compared with its image's first done row (a hash lookup, no join); the few whose image has other done
    rows that may match are joined with those."""
    fingerprint = ["file_size", "file_mtime_ns", "file_etag"]
    first = pc.index_in(candidates["image_id"], value_set=done["image_id"])
    same = _fingerprints_equal(candidates, done.select(fingerprint).take(first))
    found = [candidates["_row"].filter(same).to_numpy()]
    rest = candidates.filter(pc.and_(pc.invert(same), pc.is_valid(first)))
    if rest.num_rows:
        others = done.filter(pc.is_in(done["image_id"], value_set=rest["image_id"]))
        if others.num_rows > rest.num_rows:  # some image has more than one done row
            names = ["image_id", *fingerprint]
            theirs = others.select(names).rename_columns(["image_id", *(f"done_{n}" for n in fingerprint)])
            joined = rest.select(["_row", *names]).join(theirs, keys="image_id", join_type="inner")
            done_side = joined.select([f"done_{n}" for n in fingerprint]).rename_columns(fingerprint)
            found.append(joined["_row"].filter(_fingerprints_equal(joined, done_side)).to_numpy())
    return np.concatenate(found)


def _fingerprints_equal(ours: pa.Table, theirs: pa.Table) -> pa.Array:
    """Row by row: same size and mtime, and the same ETag where both have one; false where any is null."""
    etag, their_etag = ours["file_etag"], theirs["file_etag"]
    etag_differs = pc.and_(pc.and_(pc.is_valid(etag), pc.is_valid(their_etag)), pc.not_equal(etag, their_etag))
    same = pc.and_(
        pc.and_(
            pc.equal(ours["file_size"], theirs["file_size"]), pc.equal(ours["file_mtime_ns"], theirs["file_mtime_ns"])
        ),
        pc.invert(etag_differs.fill_null(False)),
    )
    return same.fill_null(False)


FOLLOW = "use --follow-symlinks to allow"


def file_rows(scheme: str | None, files: pa.Table, **columns: pa.Array) -> pa.Table:
    """Listing rows of image files (image_id, path, file_size, file_mtime_ns, escapes) on columns: a file
    that escapes the root through a symlink is an invalid_path error row."""
    paths, outside = files["path"], files["escapes"]
    uri_prefix = "" if scheme is None else f"{scheme}://"
    columns |= {
        "image_id": files["image_id"],
        "source_path": pc.binary_join_element_wise(uri_prefix, paths, ""),
        "file_size": files["file_size"],
        "file_mtime_ns": files["file_mtime_ns"],
    }
    if pc.any(outside).as_py():  # else no error columns at all: null, and no buffer of messages kept
        nothing = pa.scalar(None, pa.string())
        message = pc.binary_join_element_wise(paths, ": symlink outside the dataset root; " + FOLLOW, "")
        columns["error_type"] = pc.if_else(outside, pa.scalar("invalid_path"), nothing)
        columns["error_message"] = pc.if_else(outside, message, nothing)
    return pa.table(columns)


def match_named(files: pa.Table, named: pa.Table) -> tuple[pa.Table, pa.Table]:
    """The files with the label of the CSV row naming them (null where none does), and the CSV rows
    without a file. Vector lookups, not a hash join: an id named twice (rare) takes the join, one row per pair."""
    if pc.count_distinct(named["image_id"]).as_py() < named.num_rows:
        rows = named.join(files, "image_id", join_type="full outer")
        has_file = pc.is_valid(rows["path"])
        return rows.filter(has_file), rows.filter(pc.invert(has_file)).select(["image_id", "label"])
    at = pc.index_in(files["image_id"], value_set=named["image_id"])
    rows = files.append_column("label", named["label"].take(at))
    return rows, named.filter(pc.invert(pc.is_in(named["image_id"], value_set=files["image_id"])))
