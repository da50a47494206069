"""Read an image's bytes and turn them into the model's input, one row at a time.

Each file is read and decoded on its own, so one corrupt file becomes one error row
instead of taking a whole block down with it. The size check happens on the header,
before any pixel is decoded, so a decompression bomb costs no memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Iterator

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from PIL import Image, ImageOps, UnidentifiedImageError

from camjobs.config import DEFAULT_MAX_PIXELS
from camjobs.output import item_key
from camjobs.segment import to_work
from camjobs.storage import open_filesystem


class ImageInputError(Exception):
    """An input that cannot be processed; error_type is one of schema.ERROR_CODES."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type

    def __reduce__(self):  # picklable across Ray processes, which rebuild it from its args
        return type(self), (self.error_type, str(self))


@dataclass
class DecodedImage:
    pixels: np.ndarray  # (input_size, input_size, 3) uint8 RGB, the whole image squashed
    width: int  # original size after EXIF orientation
    height: int
    content_sha256: str


def read_bytes(source_path: str) -> bytes:
    fs, path = open_filesystem(source_path)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ImageInputError("missing_file", f"file not found: {source_path}")
    if info.type != pafs.FileType.File:
        raise ImageInputError("read_error", f"not a regular file: {source_path}")
    try:
        with fs.open_input_stream(path) as stream:
            data = stream.read()
    except OSError as exc:
        raise ImageInputError("read_error", f"could not read {source_path}: {exc}") from exc
    if not data:
        raise ImageInputError("empty_file", f"file is empty (0 bytes): {source_path}")
    return data


def _to_rgb(image: Image.Image) -> np.ndarray:
    """RGB uint8 from any mode Pillow decodes: L, P, RGBA, CMYK, 16-bit and 32-bit grey."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        grey = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or grey.max() > 255 else 255.0
        grey = np.clip(grey * (255.0 / peak), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "F":
        grey = np.asarray(image, dtype=np.float32)
        grey = np.clip(grey * (255.0 if grey.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels composite onto black, as most viewers show a flattened image.
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return np.asarray(image.convert("RGB"))


@contextlib.contextmanager
def _decoding(source: str) -> Iterator[None]:
    """Turn what Pillow raises on a bad file into ImageInputError(decode_error | too_large)."""
    where = f" ({source})" if source else ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except ImageInputError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageInputError("too_large", f"{exc}{where}") from exc
    except UnidentifiedImageError as exc:
        raise ImageInputError("decode_error", f"not a recognised image format{where}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageInputError("decode_error", f"corrupt or truncated image{where}: {exc}") from exc


def _open_checked(data: bytes, max_pixels: int, source: str) -> Image.Image:
    """Open (header only) and refuse oversized images before decoding any pixel."""
    image = Image.open(io.BytesIO(data))
    if image.width * image.height > max_pixels:
        where = f" ({source})" if source else ""
        raise ImageInputError(
            "too_large",
            f"{image.width}x{image.height} = {image.width * image.height:,} pixels "
            f"is over the limit of {max_pixels:,}{where}",
        )
    return image


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, source: str = "") -> np.ndarray:
    """Decode bytes to an RGB uint8 array at full size, EXIF orientation applied.

    Raises ImageInputError(decode_error | too_large).
    """
    with _decoding(source):
        image = _open_checked(data, max_pixels, source)
        image.load()
        return _to_rgb(ImageOps.exif_transpose(image))


def decode_reduced(
    data: bytes, min_side: int, *, max_pixels: int = DEFAULT_MAX_PIXELS, source: str = ""
) -> tuple[np.ndarray, int, int]:
    """Decode at a reduced size where the codec allows it; return (rgb, width, height).

    A JPEG is decoded by libjpeg at 1/2, 1/4 or 1/8 scale (Pillow's draft mode: a scaled
    inverse DCT, much cheaper than decoding every pixel), as long as both sides stay at
    least `min_side`, so a 6000 px photograph is never decoded at full size to feed a
    224 px model. width and height are the original's, after EXIF orientation: the
    heatmap and the boxes keep the original size. Other formats decode at full size.
    """
    with _decoding(source):
        image = _open_checked(data, max_pixels, source)
        width, height = image.size
        if image.get_format_mimetype() == "image/jpeg":
            image.draft("RGB", (min_side, min_side))
        image.load()
        transposed = ImageOps.exif_transpose(image)
        if transposed.size != image.size:  # EXIF orientations 5-8 turn the image by 90 degrees
            width, height = height, width
        return _to_rgb(transposed), width, height


def inspect_header(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, source: str = "") -> tuple[int, int, int]:
    """(width, height, EXIF orientation) from the header alone, size limit checked.

    For decoding elsewhere (camjobs.gpu_decode): width and height are the upright image's,
    as decode_reduced reports them. Raises ImageInputError(decode_error | too_large).
    """
    with _decoding(source):
        image = _open_checked(data, max_pixels, source)
        width, height = image.size
        orientation = int(image.getexif().get(_ORIENTATION, 1) or 1)
    if orientation in (5, 6, 7, 8):  # turned by 90 degrees
        width, height = height, width
    return width, height, orientation if 1 <= orientation <= 8 else 1


_ORIENTATION = 0x0112  # the EXIF tag


def resize_for_model(rgb: np.ndarray, input_size: int) -> np.ndarray:
    """The whole image squashed to input_size x input_size: no crop, so the map covers it all."""
    height, width = rgb.shape[:2]
    # INTER_AREA averages when shrinking by 2x or more (no aliasing). Below 2x, as after a
    # reduced JPEG decode, bilinear reads about the same pixels (within 1 grey level on
    # average) in a fifth of the time; enlarging is bilinear too.
    shrinking = width >= input_size and height >= input_size and max(width, height) >= 2 * input_size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    resized = cv2.resize(rgb, (input_size, input_size), interpolation=interpolation)
    return np.ascontiguousarray(resized)


def load_image(
    source_path: str, *, input_size: int, max_pixels: int = DEFAULT_MAX_PIXELS, reduced_decode: bool = True
) -> DecodedImage:
    """Read, hash, decode and resize one image, as the decode stage does. Raises ImageInputError."""
    data = read_bytes(source_path)
    if reduced_decode:
        rgb, width, height = decode_reduced(data, input_size, max_pixels=max_pixels, source=source_path)
    else:
        rgb = decode_image(data, max_pixels=max_pixels, source=source_path)
        height, width = rgb.shape[:2]
    return DecodedImage(
        pixels=resize_for_model(rgb, input_size),
        width=width,
        height=height,
        content_sha256=hashlib.sha256(data).hexdigest(),
    )


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


def decode_batch(
    batch: dict[str, np.ndarray],
    *,
    input_size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    skip_keys: frozenset[str] = frozenset(),
    decode_on: str = "cpu",
    refine_side: int | None = None,
) -> pa.Table:
    """The decode stage over a batch of listed inputs (a Ray Data numpy batch).

    Rows already marked bad at listing time pass through; a row that fails here gets
    its error_type and message. Bad rows carry zero pixels so the batch keeps one shape.
    An incremental run passes `skip_keys` (camjobs.output.item_key of image_id and
    content hash): a matching file is read and hashed but not decoded, and marked skipped.
    With decode_on="gpu" nothing is decoded here: the header is checked, and the file's
    bytes and EXIF orientation go on in `encoded` and `orientation` instead of `pixels`
    (the model actor decodes them, camjobs.gpu_decode).
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
    for row in range(count):
        if error_type[row] is not None:
            continue
        source = str(batch["source_path"][row])
        try:
            data = read_bytes(source)
            sha256[row] = hashlib.sha256(data).hexdigest()
            if skip_keys and item_key(str(batch["image_id"][row]), sha256[row]) in skip_keys:
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
                data, max(input_size, refine_side or 0), max_pixels=max_pixels, source=source)
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
    if refine_side:
        columns["refine_pixels"] = pa.array(refine_pixels, pa.binary())
    if on_device:
        columns["encoded"] = pa.array(encoded, pa.binary())
        columns["orientation"] = pa.array(orientation, pa.int8())
    else:
        columns["pixels"] = pa.FixedShapeTensorArray.from_numpy_ndarray(pixels)
    return pa.table(columns)
