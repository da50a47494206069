"""Reading and decoding: awkward-but-valid images decode right, bad ones get the right code."""

from __future__ import annotations

import hashlib
import io

import cv2
import numpy as np
import pytest
from PIL import Image

from camjobs.images import ImageInputError, decode_image, decode_reduced, load_image, resize_for_model
from camjobs.pipeline.decode import decode_batch


def _jpeg(array: np.ndarray, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95, **save)
    return buffer.getvalue()


def _gradient(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), np.full_like(x, 128)], axis=2).astype(
        np.uint8
    )


def test_exif_orientation_swaps_width_and_height():
    array = _gradient(40, 100)  # stored landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    rgb = decode_image(_jpeg(array, exif=exif))
    assert rgb.shape == (100, 40, 3)  # displayed portrait
    # Clockwise: the stored top-left corner ends up top-right.
    assert np.abs(rgb[0, -1].astype(int) - array[0, 0].astype(int)).max() < 12


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P"])
def test_other_modes_decode_to_rgb(mode, tmp_path):
    array = _gradient(30, 50)
    image = Image.fromarray(array).convert(mode)
    path = tmp_path / f"x.{'jpg' if mode in ('L', 'CMYK') else 'png'}"
    image.save(path)
    rgb = decode_image(path.read_bytes())
    assert rgb.shape == (30, 50, 3) and rgb.dtype == np.uint8
    expected = np.asarray(image.convert("RGB")).astype(int)
    assert np.abs(rgb.astype(int) - expected).mean() < 3


def test_16_bit_png_scales_to_8_bits(tmp_path):
    grey16 = (np.linspace(0, 65535, 64 * 32).reshape(32, 64)).astype(np.uint16)
    path = tmp_path / "deep.png"
    cv2.imwrite(str(path), grey16)
    rgb = decode_image(path.read_bytes())
    assert rgb.shape == (32, 64, 3)
    expected = (grey16.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.abs(rgb[:, :, 0].astype(int) - expected.astype(int)).max() <= 1


def test_bad_inputs_get_their_codes(tmp_path):
    good = _jpeg(_gradient(64, 64))
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.jpg").write_bytes(b"this is not an image\n" * 10)
    expectations = {
        "empty.jpg": "empty_file",
        "truncated.jpg": "decode_error",
        "text.jpg": "decode_error",
        "gone.jpg": "missing_file",
    }
    for name, code in expectations.items():
        with pytest.raises(ImageInputError) as caught:
            load_image(str(tmp_path / name), input_size=32)
        assert caught.value.error_type == code, name


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    # A 20000x20000 PNG of zeros compresses to a few hundred KB but would need 1.2 GB decoded.
    path = tmp_path / "bomb.png"
    Image.new("L", (20000, 20000)).save(path, optimize=False)
    with pytest.raises(ImageInputError) as caught:
        load_image(str(path), input_size=32, max_pixels=100_000_000)
    assert caught.value.error_type == "too_large"
    with pytest.raises(ImageInputError) as small_limit:
        decode_image(_jpeg(_gradient(64, 64)), max_pixels=64 * 64 - 1)
    assert small_limit.value.error_type == "too_large"


def test_load_image_hashes_bytes_and_resizes_whole_image(tmp_path):
    import hashlib

    data = _jpeg(_gradient(90, 120))
    path = tmp_path / "Ünïcode name.JPG"
    path.write_bytes(data)
    image = load_image(str(path), input_size=48)
    assert (image.width, image.height) == (120, 90)
    assert image.content_sha256 == hashlib.sha256(data).hexdigest()
    assert image.pixels.shape == (48, 48, 3)
    expected = cv2.resize(decode_image(data), (48, 48), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(image.pixels, expected)
    # The whole image is kept, no crop: left edge dark red channel, right edge bright.
    assert image.pixels[:, 0, 0].mean() < 20 and image.pixels[:, -1, 0].mean() > 235


def test_upscaling_small_images_uses_linear():
    small = _gradient(10, 10)
    np.testing.assert_array_equal(
        resize_for_model(small, 32), cv2.resize(small, (32, 32), interpolation=cv2.INTER_LINEAR)
    )


def test_shrinking_by_less_than_two_is_bilinear_and_close_to_area_averaging():
    image = _photo_like(225, 300)  # a 600x450 JPEG after decoding at 1/2 scale
    resized = resize_for_model(image, 224)
    np.testing.assert_array_equal(resized, cv2.resize(image, (224, 224), interpolation=cv2.INTER_LINEAR))
    area = cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA)
    assert np.abs(resized.astype(int) - area.astype(int)).mean() < 1.0
    # From twice the input size on, area averaging.
    big = _photo_like(300, 448)
    np.testing.assert_array_equal(resize_for_model(big, 224), cv2.resize(big, (224, 224), interpolation=cv2.INTER_AREA))


def test_decode_batch_keeps_every_row(tmp_path):
    (tmp_path / "ok.jpg").write_bytes(_jpeg(_gradient(20, 30)))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    batch = {
        "image_id": np.array(["ok", "bad", "listed"], dtype=object),
        "source_path": np.array([str(tmp_path / "ok.jpg"), str(tmp_path / "bad.jpg"), "/nowhere"], dtype=object),
        "label": np.array(["nv", None, None], dtype=object),
        "error_type": np.array([None, None, "invalid_path"], dtype=object),
        "error_message": np.array([None, None, "escapes root"], dtype=object),
    }
    table = decode_batch(batch, input_size=16)
    out = table.to_pydict()
    assert out["error_type"] == [None, "decode_error", "invalid_path"]
    assert out["error_message"][2] == "escapes root"
    assert table["pixels"].combine_chunks().to_numpy_ndarray().shape == (3, 16, 16, 3)
    assert (out["width"][0], out["height"][0]) == (30, 20)
    # Bytes that were read are hashed, decodable or not; a row never read has no hash.
    assert (
        out["content_sha256"][0] is not None
        and out["content_sha256"][1] is not None
        and out["content_sha256"][2] is None
    )
    # Nothing but nulls still reads back as a string column, never as NaN floats.
    assert (
        decode_batch({k: v[2:] for k, v in batch.items()}, input_size=8).schema.field("content_sha256").type == "string"
    )


def test_decode_batch_for_the_device_checks_headers_and_passes_bytes_on(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {
        "ok.jpg": _jpeg(_gradient(20, 30)),
        "turned.jpg": _jpeg(_gradient(20, 30), exif=exif),
        "bad.jpg": b"\xff\xd8garbage",
        "huge.jpg": _jpeg(_gradient(40, 50)),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    names = list(files)
    batch = {
        "image_id": np.array(names, dtype=object),
        "source_path": np.array([str(tmp_path / n) for n in names], dtype=object),
        "label": np.array([None] * 4, dtype=object),
        "error_type": np.array([None] * 4, dtype=object),
        "error_message": np.array([None] * 4, dtype=object),
    }
    table = decode_batch(batch, input_size=16, max_pixels=1000, decode_on="gpu")
    assert "pixels" not in table.column_names  # nothing decoded here
    out = table.to_pydict()
    # bad.jpg: not even a header; huge.jpg: 2,000 pixels over the limit of 1,000, found from the header
    assert out["error_type"] == [None, None, "decode_error", "too_large"]
    assert out["encoded"][:2] == [files["ok.jpg"], files["turned.jpg"]] and out["encoded"][2:] == [None, None]
    assert out["orientation"][:2] == [1, 6]
    assert list(zip(out["width"], out["height"]))[:2] == [(30, 20), (20, 30)]  # upright sizes, as decode_reduced's
    assert out["content_sha256"][0] == hashlib.sha256(files["ok.jpg"]).hexdigest()


def _photo_like(height: int, width: int) -> np.ndarray:
    """Smooth colour plus texture: JPEG's scaled decoding is exact only up to rounding."""
    rng = np.random.default_rng(0)
    base = _gradient(height, width).astype(np.float64)
    noise = cv2.GaussianBlur(rng.normal(0, 40, (height, width, 3)), (0, 0), 3)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("min_side, scale", [(224, 2), (100, 4), (50, 8), (300, 1), (500, 1)])
def test_reduced_jpeg_decoding_matches_libjpeg_scaled_decode(min_side, scale):
    data = _jpeg(_photo_like(450, 600))
    rgb, width, height = decode_reduced(data, min_side)
    assert (width, height) == (600, 450)  # the original's size, for the heatmap and boxes
    assert rgb.shape == (-(-450 // scale), -(-600 // scale), 3) and min(rgb.shape[:2]) >= min(min_side, 450)
    # Oracle: OpenCV's own reduced decoding (its copy of libjpeg), or a full decode at scale 1.
    flags = {
        1: cv2.IMREAD_COLOR,
        2: cv2.IMREAD_REDUCED_COLOR_2,
        4: cv2.IMREAD_REDUCED_COLOR_4,
        8: cv2.IMREAD_REDUCED_COLOR_8,
    }
    expected = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), flags[scale]), cv2.COLOR_BGR2RGB)
    assert expected.shape == rgb.shape
    assert np.abs(rgb.astype(int) - expected.astype(int)).max() <= 2


def test_reduced_decoding_keeps_the_model_input_close_to_a_full_decode(tmp_path):
    path = tmp_path / "ISIC_0000000.jpg"
    path.write_bytes(_jpeg(_photo_like(450, 600)))
    reduced = load_image(str(path), input_size=224)
    full = load_image(str(path), input_size=224, reduced_decode=False)
    assert (reduced.width, reduced.height) == (full.width, full.height) == (600, 450)
    difference = np.abs(reduced.pixels.astype(int) - full.pixels.astype(int))
    assert difference.mean() < 1.5 and difference.max() < 40


def test_reduced_decoding_applies_exif_orientation_and_reports_the_displayed_size():
    array = _photo_like(200, 480)  # stored landscape
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb, width, height = decode_reduced(_jpeg(array, exif=exif), 64)
    assert (width, height) == (200, 480)  # displayed portrait
    assert rgb.shape == (480 // 2, 200 // 2, 3)  # 1/2: 100 >= 64, and 1/4 would give 50
    full = decode_image(_jpeg(array, exif=exif))
    shrunk = cv2.resize(full, (100, 240), interpolation=cv2.INTER_AREA)
    assert np.abs(rgb.astype(int) - shrunk.astype(int)).mean() < 3


def test_reduced_decoding_leaves_other_formats_and_limits_alone():
    array = _gradient(300, 400)
    ok, png = cv2.imencode(".png", array)
    rgb, width, height = decode_reduced(png.tobytes(), 32)
    assert (width, height) == (400, 300)
    np.testing.assert_array_equal(rgb, array[:, :, ::-1])  # cv2 wrote BGR
    with pytest.raises(ImageInputError) as caught:
        decode_reduced(_jpeg(_gradient(64, 64)), 8, max_pixels=64 * 64 - 1)
    assert caught.value.error_type == "too_large"
    with pytest.raises(ImageInputError) as broken:
        decode_reduced(_jpeg(_gradient(64, 64))[:200], 8)
    assert broken.value.error_type == "decode_error"
