"""The decode stage: read, hash and decode a block of listed images, one row at a time.

Each file is read and decoded on its own (camjobs.images), so one corrupt file becomes one
error row instead of taking a whole block down with it.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from camjobs.config import DEFAULT_MAX_PIXELS
from camjobs.images import ImageInputError, decode_reduced, inspect_header, read_bytes, resize_for_model
from camjobs.schema import FINGERPRINT_FIELDS
from camjobs.segment import to_work


def _string_columns(batch: dict[str, np.ndarray], error_type: list, error_message: list, sha256: list) -> dict:
    """The rows' identity and outcome as Arrow string columns: typed, so a column of nulls stays a string column."""
    strings = {
        "image_id": list(batch["image_id"]),
        "source_path": list(batch["source_path"]),
        "label": list(batch["label"]),
        "error_type": error_type,
        "error_message": error_message,
        "content_sha256": sha256,
    }
    return {name: pa.array(values, pa.string()) for name, values in strings.items()}


def _fingerprint_columns(batch: dict[str, np.ndarray], count: int) -> dict[str, pa.Array]:
    """The listed file's fingerprint, passed on; none where the rows come from elsewhere than a listing."""
    return {
        f.name: pa.array(batch[f.name], f.type) if f.name in batch else pa.nulls(count, f.type)
        for f in FINGERPRINT_FIELDS
    }


def decode_batch(
    batch: dict[str, np.ndarray],
    *,
    input_size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    decode_on: str = "cpu",
    refine_side: int | None = None,
) -> pa.Table:
    """The decode stage over a batch of listed inputs (a Ray Data numpy batch).

    Rows already marked bad at listing time pass through; a row that fails here gets
    its error_type and message. Bad rows carry zero pixels so the batch keeps one shape.
    An incremental run fills in `done_sha256` where an image has done rows (listing.match_done): a file
    whose hash is one of them is marked skipped, not decoded. The file's fingerprint goes on with each row.
    With decode_on="gpu" nothing is decoded here: the header is checked, and the file's
    bytes and EXIF orientation go on in `encoded` and `orientation` instead of `pixels`
    (the model actor decodes them, camjobs.pipeline.gpu_decode).
    With refine_side (camjobs run --refine), each good row also carries `refine_pixels`: the
    image at longer side refine_side (segment.to_work) as raw RGB bytes, for the localize
    stage's refinement; its shape follows from width and height (segment.work_size). On the
    device path it is decoded here at a reduced size, as small as the codec allows.
    The result is an Arrow table with explicit types: a column of nothing but nulls
    must stay a string column, or the next stage would see NaNs.
    """
    count = len(batch["image_id"])
    on_device = decode_on == "gpu"
    pixels = np.zeros((0 if on_device else count, input_size, input_size, 3), dtype=np.uint8)
    encoded: list[bytes | None] = [None] * count
    orientation = np.ones(count, dtype=np.int8)
    width = np.zeros(count, dtype=np.int32)
    height = np.zeros(count, dtype=np.int32)
    sha256: list[str | None] = [None] * count
    skipped = [False] * count
    refine_pixels: list[bytes | None] = [None] * count
    error_type = list(batch["error_type"])
    error_message = list(batch["error_message"])
    done = batch.get("done_sha256")
    for row in range(count):
        if error_type[row] is not None:
            continue
        source = str(batch["source_path"][row])
        try:
            data = read_bytes(source)
            sha256[row] = hashlib.sha256(data).hexdigest()
            if done is not None and done[row] is not None and sha256[row] in set(done[row]):
                skipped[row] = True
                continue
            if on_device:
                width[row], height[row], orientation[row] = inspect_header(data, max_pixels=max_pixels, source=source)
                encoded[row] = data
                if refine_side:
                    rgb, _, _ = decode_reduced(data, refine_side, max_pixels=max_pixels, source=source)
                    refine_pixels[row] = to_work(rgb, refine_side, (width[row], height[row])).tobytes()
                continue
            rgb, width[row], height[row] = decode_reduced(
                data, max(input_size, refine_side or 0), max_pixels=max_pixels, source=source
            )
            if refine_side:
                refine_pixels[row] = to_work(rgb, refine_side, (width[row], height[row])).tobytes()
        except ImageInputError as exc:
            error_type[row], error_message[row] = exc.error_type, str(exc)
            continue
        except Exception as exc:  # one unexpected failure must not take the batch down
            error_type[row], error_message[row] = "decode_error", f"{type(exc).__name__}: {exc}"
            continue
        pixels[row] = resize_for_model(rgb, input_size)
    columns = _string_columns(batch, error_type, error_message, sha256)
    columns["width"] = pa.array(width, pa.int32())
    columns["height"] = pa.array(height, pa.int32())
    columns["skipped"] = pa.array(skipped, pa.bool_())
    columns.update(_fingerprint_columns(batch, count))
    if refine_side:
        columns["refine_pixels"] = pa.array(refine_pixels, pa.binary())
    if on_device:
        columns["encoded"] = pa.array(encoded, pa.binary())
        columns["orientation"] = pa.array(orientation, pa.int8())
    else:
        columns["pixels"] = pa.FixedShapeTensorArray.from_numpy_ndarray(pixels)
    return pa.table(columns)
