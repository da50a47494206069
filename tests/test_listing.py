"""The listing as Arrow: its schema, the walks (local and the object-store path in parallel), the duplicate
rule on columns, and the match against an incremental run's done rows. No Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from camjobs import dataset_root
from camjobs.dataset_root import FILES_SCHEMA, DatasetRoot, walk_files
from camjobs.layouts import list_images
from camjobs.listing import ListingBuilder, match_done, unique_ids
from camjobs.schema import LISTING_SCHEMA


def _tree(root: Path) -> list[Path]:
    """Files in nested folders, hidden ones and a staging folder among them."""
    files = []
    for folder in ("", "a", "a/b", "c", "c/d/e"):
        for i in range(3):
            path = root / folder / f"img{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(os.urandom(10 + i))
            files.append(path)
    for hidden in (".hidden/x.jpg", "_staging/y.jpg", "a/.z.jpg"):
        (root / hidden).parent.mkdir(parents=True, exist_ok=True)
        (root / hidden).write_bytes(b"h")
    return files


def _rows(batches) -> list[tuple]:
    table = pa.Table.from_batches(list(batches), schema=FILES_SCHEMA)
    return sorted(zip(*(table[name].to_pylist() for name in ("path", "size", "mtime_ns"))))


def test_the_object_store_walk_in_parallel_gives_the_local_walks_rows(tmp_path, monkeypatch):
    files = _tree(tmp_path)
    expected = sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)  # the oracle: os.stat
    local = DatasetRoot(pafs.LocalFileSystem(), str(tmp_path), None, str(tmp_path), False)
    assert _rows(walk_files(local)) == expected
    # real_root None: the remote code path (top level, then each folder recursively in a thread pool)
    monkeypatch.setattr(dataset_root, "BATCH_ROWS", 2)
    remote = DatasetRoot(pafs.LocalFileSystem(), str(tmp_path), "file", None, False)
    assert _rows(walk_files(remote)) == expected
    assert _rows(walk_files(local)) == expected  # small batches too


def test_the_listing_is_arrow_with_each_files_fingerprint(tmp_path):
    files = _tree(tmp_path)
    listing = list_images(str(tmp_path), "folder")
    assert listing.table.schema == LISTING_SCHEMA and len(listing) == len(files)
    ids = listing.table["image_id"].to_pylist()
    assert ids == sorted(ids)
    by_path = {r.source_path: r for r in listing.records}
    for path in files:
        record = by_path[str(path)]
        assert (record.file_size, record.file_mtime_ns) == (path.stat().st_size, path.stat().st_mtime_ns)
        assert record.image_id == str(path.relative_to(tmp_path).with_suffix(""))
        assert record.file_etag is None and record.error_type is None


def _duplicates_by_loop(rows: list[dict]) -> list[tuple]:
    """The rule as the old per-record loop had it: an independent implementation."""
    rows = sorted(rows, key=lambda r: (r["image_id"], r["error_type"] is not None, r["source_path"]))
    taken, result, first, count = {r["image_id"] for r in rows}, [], None, 1
    for row in rows:
        if first is None or row["image_id"] != first["image_id"]:
            first, count = row, 1
            result.append((row["image_id"], row["source_path"], row["error_type"]))
            continue
        count += 1
        while f"{row['image_id']}#{count}" in taken:
            count += 1
        taken.add(f"{row['image_id']}#{count}")
        result.append((f"{row['image_id']}#{count}", row["source_path"], row["error_type"] or "duplicate_id"))
    return sorted(result)


@pytest.mark.parametrize("batch_rows", [1, 3, 8192])
def test_duplicate_ids_on_columns_follow_the_rule(batch_rows, monkeypatch):
    monkeypatch.setattr("camjobs.listing.BATCH_ROWS", batch_rows)
    rows = [
        {"image_id": "x", "source_path": "/d/3/x.jpg", "error_type": None},
        {"image_id": "x", "source_path": "/d/1/x.jpg", "error_type": "invalid_path"},
        {"image_id": "x", "source_path": "/d/2/x.jpg", "error_type": None},
        {"image_id": "x#2", "source_path": "/d/x#2.jpg", "error_type": None},  # a name a rename must skip
        {"image_id": "y", "source_path": "/d/y.jpg", "error_type": None},
        {"image_id": "z", "source_path": "/d/z.png", "error_type": None},
        {"image_id": "z", "source_path": "/d/z.jpg", "error_type": None},
    ]
    builder = ListingBuilder()
    for row in rows:
        builder.add(row["image_id"], row["source_path"], error_type=row["error_type"])
    table = builder.table()
    got = sorted(zip(*(table[n].to_pylist() for n in ("image_id", "source_path", "error_type"))))
    assert got == _duplicates_by_loop(rows)
    assert table["image_id"].to_pylist() == sorted(table["image_id"].to_pylist())
    messages = dict(zip(table["image_id"].to_pylist(), table["error_message"].to_pylist()))
    assert messages["x#3"] == "image_id 'x' already used by /d/2/x.jpg" and messages["x"] is None
    assert unique_ids(LISTING_SCHEMA.empty_table()).num_rows == 0


def _listing(rows: list[tuple]) -> pa.Table:
    names = ("image_id", "source_path", "error_type", "file_size", "file_mtime_ns", "file_etag")
    return pa.Table.from_pylist([dict(zip(names, row)) for row in rows], schema=LISTING_SCHEMA)


def _done(rows: list[tuple]) -> pa.Table:
    names = ("image_id", "content_sha256", "file_size", "file_mtime_ns", "file_etag")
    types = [LISTING_SCHEMA.field(n).type if n != "content_sha256" else pa.string() for n in names]
    return pa.Table.from_pylist([dict(zip(names, row)) for row in rows], schema=pa.schema(list(zip(names, types))))


def test_match_done_skips_same_fingerprints_and_hands_the_rest_their_hashes():
    listing = _listing(
        [
            ("a", "/a", None, 10, 100, None),  # same fingerprint: skipped
            ("b", "/b", None, 20, 201, None),  # touched: hashed against both of its done hashes
            ("c", "/c", None, 30, 300, None),  # new
            ("d", "/d", "missing_file", 40, 400, None),  # listing-time errors are never skipped
            ("e", "/e", None, 50, 500, "etag-new"),  # same size and mtime, another ETag: hashed
            ("f", "/f", None, 60, 600, "etag-f"),  # an ETag on one side only: the fingerprint decides
            ("g", "/g", None, None, None, None),  # no fingerprint: hashed
            ("h", "/h", None, 70, 700, None),  # its second done row matches: skipped
        ]
    )
    done = _done(
        [
            ("a", "h-a", 10, 100, None),
            ("b", "h-b1", 20, 200, None),
            ("b", "h-b2", 21, 200, None),
            ("d", "h-d", 40, 400, None),
            ("e", "h-e", 50, 500, "etag-old"),
            ("f", "h-f", 60, 600, None),
            ("g", "h-g", None, None, None),
            ("h", "h-h1", 71, 700, None),
            ("h", "h-h2", 70, 700, None),
        ]
    )
    pending, unopened = match_done(listing, done)
    assert unopened == 3
    assert pending.schema == LISTING_SCHEMA
    got = {r["image_id"]: r["done_sha256"] and sorted(r["done_sha256"]) for r in pending.to_pylist()}
    assert got == {"b": ["h-b1", "h-b2"], "c": None, "d": ["h-d"], "e": ["h-e"], "g": ["h-g"]}
    assert pending["image_id"].to_pylist() == ["b", "c", "d", "e", "g"]  # listing order kept

    rehashed, unopened = match_done(listing, done, rehash=True)
    assert unopened == 0 and rehashed.num_rows == listing.num_rows
    assert {r["image_id"]: r["done_sha256"] for r in rehashed.to_pylist()}["a"] == ["h-a"]
    untouched, unopened = match_done(listing, done.slice(0, 0))
    assert unopened == 0 and untouched.equals(listing)
