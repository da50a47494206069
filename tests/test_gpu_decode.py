"""Decoding on the model's device, run here on the CPU device (the same code, libjpeg-turbo),
against Pillow and against the decode stage's own CPU path."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import camjobs.pipeline.gpu_decode as gpu_decode
from camjobs.images import DEFAULT_MAX_PIXELS, inspect_header, load_image
from camjobs.pipeline.gpu_decode import decode_to_input, orient, resize_on_device

CPU = torch.device("cpu")


def _photo_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 128.0)], axis=2)
    noise = cv2.GaussianBlur(rng.normal(0, 40, (height, width, 3)), (0, 0), 3)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _encode(
    array: np.ndarray, format: str = "JPEG", orientation: int | None = None, mode: str | None = None, **save
) -> bytes:
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    save = {"quality": 95, **save} if format == "JPEG" else save
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        save["exif"] = exif
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_pillows_exif_transpose(orientation):
    array = _photo_like(5, 7)
    image = Image.fromarray(array)
    image.getexif()[0x0112] = orientation
    expected = np.asarray(ImageOps.exif_transpose(image))
    got = orient(torch.from_numpy(array).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, expected)


def test_resize_on_device_is_close_to_the_cpu_resize_one_image_or_a_batch():
    array = _photo_like(450, 600)
    got = resize_on_device(torch.from_numpy(array).permute(2, 0, 1), 224).permute(1, 2, 0).numpy()
    area = cv2.resize(array, (224, 224), interpolation=cv2.INTER_AREA)
    assert got.shape == (224, 224, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - area.astype(int)).mean() < 1.0
    images = torch.stack([torch.from_numpy(_photo_like(45, 60, seed=s)).permute(2, 0, 1) for s in range(3)])
    batched = resize_on_device(images, 32)
    assert torch.equal(batched, torch.stack([resize_on_device(image, 32) for image in images]))


def _files(tmp_path):
    """name -> (path, bytes): what a dermoscopy folder may hold, good and bad."""
    photo = _photo_like(450, 600)
    files = {
        "plain": _encode(photo),
        "rotated": _encode(_photo_like(300, 400, seed=1), orientation=6),  # displayed portrait
        "mirrored": _encode(_photo_like(300, 400, seed=2), orientation=2),
        "grey": _encode(photo[:, :, 1]),
        "progressive": _encode(photo[::2, ::2].copy(), progressive=True),
        "cmyk": _encode(photo[:300, :400].copy(), mode="CMYK"),
        "png": _encode(photo[:200, :300].copy(), format="PNG"),
        "truncated": _encode(photo)[:5000],
        "not_an_image": b"\xff\xd8" + bytes(500),
    }
    paths = {}
    for name, data in files.items():
        path = tmp_path / f"{name}.img"
        path.write_bytes(data)
        paths[name] = (str(path), data)
    return paths


def test_batch_decodes_like_the_decode_stage_and_isolates_bad_files(tmp_path, monkeypatch):
    files = _files(tmp_path)
    names = list(files)
    encoded = [files[n][1] for n in names]
    headers = {}
    for name in names:
        try:
            headers[name] = inspect_header(files[name][1])
        except Exception:
            headers[name] = (1, 1, 1)  # what the decode stage would have turned into an error row
    sizes = [headers[n][:2] for n in names]
    orientations = [headers[n][2] for n in names]
    # A small budget per device call: the batch is decoded in several groups.
    monkeypatch.setattr(gpu_decode, "MAX_PIXELS_PER_CALL", 600 * 450 * 2)
    pixels, errors, cpu_sizes = decode_to_input(
        encoded, sizes, orientations, 224, CPU, sources=[files[n][0] for n in names]
    )
    assert pixels.shape == (len(names), 3, 224, 224) and pixels.dtype == torch.uint8
    by_name = dict(zip(names, errors))
    assert {n for n, e in by_name.items() if e is not None} == {"truncated", "not_an_image"}
    assert all(
        by_name[n].error_type == "decode_error" and files[n][0] in str(by_name[n])
        for n in ("truncated", "not_an_image")
    )
    assert dict(zip(names, cpu_sizes))["png"] == (300, 200)  # not a JPEG: decoded on the CPU, its size reported
    for i, name in enumerate(names):
        if by_name[name] is not None:
            assert not pixels[i].any()
            continue
        expected = load_image(files[name][0], input_size=224)  # the decode stage's own path
        assert (expected.width, expected.height) == tuple(sizes[i]) or cpu_sizes[i] == (expected.width, expected.height)
        got = pixels[i].permute(1, 2, 0).numpy().astype(int)
        difference = np.abs(got - expected.pixels.astype(int))
        # Full decode + antialiased resize against libjpeg's scaled decode + OpenCV's resize.
        assert difference.mean() < 1.0 and np.percentile(difference, 99) <= 3, (name, difference.mean())
    assert sizes[names.index("rotated")] == (300, 400)


def test_one_group_or_many_gives_the_same_pixels(monkeypatch):
    encoded = [_encode(_photo_like(60 + 10 * i, 80, seed=i)) for i in range(5)]
    sizes, orientations = [(80, 60 + 10 * i) for i in range(5)], [1] * 5
    whole, _, _ = decode_to_input(encoded, sizes, orientations, 32, CPU)
    monkeypatch.setattr(gpu_decode, "MAX_PIXELS_PER_CALL", 1)  # one image per call
    single, _, _ = decode_to_input(encoded, sizes, orientations, 32, CPU)
    assert torch.equal(whole, single)


def test_cpu_fallback_keeps_the_limit_the_decode_stage_checked():
    # A PNG over the default 100 MP limit that the run's --max-pixels allowed: its header was
    # checked upstream, so the actor's CPU fallback decodes it rather than refusing it.
    width, height = 10_001, 10_000
    assert width * height > DEFAULT_MAX_PIXELS
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG", compress_level=1)
    pixels, errors, cpu_sizes = decode_to_input([buffer.getvalue()], [(width, height)], [1], 32, CPU)
    assert errors == [None] and cpu_sizes == [(width, height)] and pixels.shape == (1, 3, 32, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nvjpeg_on_the_gpu_matches_the_cpu_device(tmp_path):
    files = _files(tmp_path)
    encoded = [data for _, data in files.values()]
    headers = []
    for data in encoded:
        try:
            headers.append(inspect_header(data))
        except Exception:
            headers.append((1, 1, 1))
    sizes, orientations = [h[:2] for h in headers], [h[2] for h in headers]
    on_cpu, cpu_errors, _ = decode_to_input(encoded, sizes, orientations, 224, CPU)
    on_gpu, gpu_errors, _ = decode_to_input(encoded, sizes, orientations, 224, torch.device("cuda"))
    assert [e is None for e in gpu_errors] == [e is None for e in cpu_errors]
    difference = (on_gpu.cpu().int() - on_cpu.int()).abs().float()
    # nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by a grey level or two.
    assert difference.mean() < 1.5 and difference.max() < 40
