"""The output contract: Arrow schemas of DIR/cams and DIR/errors, and the error codes.

Readers (pandas.read_parquet, pyarrow.dataset, camjobs' own evaluate/export) rely on
these column names and types; change them only together with SCHEMA_VERSION.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

SCHEMA_VERSION = 4
# Version 2 added mask_rle, refined_boxes and refine (camjobs run --refine); version 3 added probs;
# version 4 added the source file's fingerprint (file_size, file_mtime_ns, file_etag).
# Readers accept files of earlier versions too: read through CAMS_SCHEMA, their missing columns
# come back as nulls.

# Short codes written to errors.error_type. Listing-time codes come from camjobs.layouts,
# read/decode codes from camjobs.images, the last one from the model actor. Every code the
# package writes is one of these, and each of these is written somewhere (tests/test_errors.py).
ERROR_CODES = {
    "missing_file": "the metadata names a file that does not exist",
    "invalid_path": "the id or path would leave the dataset root (../, absolute, symlink outside)",
    "duplicate_id": "a second file with an image_id that is already taken",
    "empty_file": "the file has zero bytes",
    "read_error": "the file exists but could not be read (permissions, I/O error)",
    "decode_error": "not a decodable image: corrupt, truncated, or another format behind an image extension",
    "too_large": "more pixels than --max-pixels (decompression bomb guard), checked before decoding",
    "model_error": "the model stage failed on this image (e.g. non-finite activations)",
}

BOX_TYPE = pa.struct(
    [
        ("x_min", pa.float32()),
        ("y_min", pa.float32()),
        ("x_max", pa.float32()),
        ("y_max", pa.float32()),
        ("score", pa.float32()),
    ]
)

# A binary mask in COCO's compressed run-length encoding (pycocotools.mask.encode, counts as
# text): size is [height, width], the image's own size.
# The source file as the listing saw it (pyarrow.fs.FileInfo): an incremental run skips an image whose
# id and fingerprint match a done row without opening it. pyarrow.fs exposes no ETag, so file_etag is
# null for now; where both sides have one it must match too.
FINGERPRINT_FIELDS = (
    pa.field("file_size", pa.int64()),
    pa.field("file_mtime_ns", pa.int64()),
    pa.field("file_etag", pa.string()),
)

RLE_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])

CAMS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_path", pa.string()),
        ("content_sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("label", pa.string()),
        ("pred_index", pa.int32()),
        ("pred_label", pa.string()),
        ("pred_score", pa.float32()),
        # every class's softmax probability, in the model's class order (the run summary's
        # model.classes); pred_score is its maximum, pred_index its argmax
        ("probs", pa.list_(pa.float32())),
        ("target_index", pa.int32()),
        ("target_label", pa.string()),
        ("method", pa.string()),
        ("cam", pa.list_(pa.float32())),
        ("cam_height", pa.int32()),
        ("cam_width", pa.int32()),
        ("heatmap_png", pa.binary()),
        ("threshold", pa.float32()),
        ("boxes", pa.list_(BOX_TYPE)),
        # --refine: the lesion mask the image's evidence draws inside the CAM's region, and its
        # components' boxes (largest first, scores as in boxes); null without --refine, or where
        # the map has no region to refine.
        ("mask_rle", RLE_TYPE),
        ("refined_boxes", pa.list_(BOX_TYPE)),
        ("refine", pa.string()),  # the refinement method's name; null without --refine
        ("model_sha256", pa.string()),
        ("target_mode", pa.string()),
        ("input_size", pa.int32()),
        ("run_id", pa.string()),
        ("schema_version", pa.int32()),
        *FINGERPRINT_FIELDS,
    ],
    metadata={"camjobs.schema_version": str(SCHEMA_VERSION)},
)

ERRORS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_path", pa.string()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("run_id", pa.string()),
        ("schema_version", pa.int32()),
    ],
    metadata={"camjobs.schema_version": str(SCHEMA_VERSION)},
)

# The listing (camjobs.layouts.DatasetListing.table), which the job hands to the decode stage: one row per
# input, with the file's fingerprint; done_sha256 is what an incremental run fills in for an image that has
# done rows whose fingerprint differs: their content hashes, which the decode stage compares.
LISTING_SCHEMA = pa.schema(
    [(name, pa.string()) for name in ("image_id", "source_path", "label", "mask_path", "error_type", "error_message")]
    + list(FINGERPRINT_FIELDS)
    + [pa.field("done_sha256", pa.list_(pa.string()))]
)

# OUTPUT/fingerprints/<run_id>/: the images an incremental run hashed and found unchanged (a touched file),
# with the fingerprint they have now, so that the next run skips them without reading them again.
FINGERPRINTS_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("content_sha256", pa.string()), *FINGERPRINT_FIELDS, ("run_id", pa.string())],
    metadata={"camjobs.schema_version": str(SCHEMA_VERSION)},
)

# What flows out of the model actor into the sink: every column of both tables (an
# error row has nulls in the cam columns), the node that did the work, whether an
# incremental run skipped the image, and the refinement's working columns.
RESULT_SCHEMA = pa.schema(
    list(CAMS_SCHEMA)
    + [f for f in ERRORS_SCHEMA if f.name not in CAMS_SCHEMA.names]
    + [pa.field("node_id", pa.string()), pa.field("skipped", pa.bool_())]
    # --refine: the decode stage's working image (raw RGB, segment.work_size), used up by the
    # localize stage, and why the refinement failed on a row (counted in the run's summary).
    + [pa.field("refine_pixels", pa.binary()), pa.field("refine_error", pa.string())]
)

# Ray Data's numpy batches turn an int64 column with nulls into floats, where an mtime in nanoseconds
# loses digits: inside the pipeline the fingerprint's integer columns carry this value for "none"
# (camjobs.pipeline.job fills it in, camjobs.pipeline.sink turns it back into nulls).
NO_INT = -(2**63)
FINGERPRINT_INTS = ("file_size", "file_mtime_ns")

# What an incremental run compares: a row with the same values in these columns, for the
# same image_id and content_sha256, makes processing that image again pointless.
SETTINGS_COLUMNS = ("model_sha256", "method", "threshold", "target_mode", "input_size", "refine")
# Settings that rows and run summaries of an earlier version lack, and what their absence means.
SETTINGS_ADDED = {"refine": None}


@dataclass(kw_only=True)
class ImageRow:
    """The columns of a DIR/cams row that say which image, its size, its label and the model's
    answer: what the exporters (camjobs.labels.export) and the gallery (camjobs.labels.viz) both read."""

    image_id: str
    source_path: str
    width: int
    height: int
    label: str | None
    pred_label: str | None
    pred_score: float | None
    target_label: str | None
    run_id: str
