"""Read one image file and decode it: bytes, RGB pixels (EXIF applied), the model's input size.

Every failure is an ImageInputError naming its error code, so the pipeline turns one corrupt
file into one error row and the label tools into one clear message. The size check happens
on the header, before any pixel is decoded, so a decompression bomb costs no memory.
Needs Pillow, numpy, OpenCV and pyarrow's file systems only (the label tools import it).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import pyarrow.fs as pafs
from PIL import Image, ImageOps, UnidentifiedImageError

from camjobs.config import DEFAULT_MAX_PIXELS
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

    For decoding elsewhere (camjobs.pipeline.gpu_decode): width and height are the upright image's,
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
