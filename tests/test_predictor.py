"""The model actor's work, without Ray: rows in, maps out, errors passed through, OOM splitting."""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import pytest
import torch

import camjobs.pipeline.predictor
from camjobs.cam import build_extractor
from camjobs.models.networks import IMAGENET_MEAN, IMAGENET_STD
from camjobs.pipeline.predictor import CamPredictor, ModelSpec, autocast_dtype
from camjobs.schema import RESULT_SCHEMA

CLASSES = ("mel", "nv", "bkl")
SIZE = 64


def _batch(count: int, bad_rows: set[int] = frozenset(), skipped_rows: set[int] = frozenset()) -> dict[str, np.ndarray]:
    """A decode-stage batch as Ray Data hands it to the actor (numpy format)."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (count, SIZE, SIZE, 3), dtype=np.uint8)
    bad = [r in bad_rows for r in range(count)]
    return {
        "image_id": np.array([f"ISIC_{i:07d}" for i in range(count)], dtype=object),
        "source_path": np.array([f"/data/ISIC_{i:07d}.jpg" for i in range(count)], dtype=object),
        "label": np.array([CLASSES[i % 3] for i in range(count)], dtype=object),
        "error_type": np.array(["decode_error" if b else None for b in bad], dtype=object),
        "error_message": np.array(["corrupt" if b else None for b in bad], dtype=object),
        "content_sha256": np.array([f"{i:064x}" for i in range(count)], dtype=object),
        "width": np.array([0 if b else 600 for b in bad], dtype=np.int32),
        "height": np.array([0 if b else 450 for b in bad], dtype=np.int32),
        "skipped": np.array([r in skipped_rows for r in range(count)]),
        "pixels": pixels,
    }


@pytest.fixture(autouse=True)
def cpu_predictor(monkeypatch):
    """The predictor on the CPU, where results are exact, also on a machine with a GPU."""
    monkeypatch.setattr(camjobs.pipeline.predictor, "choose_device", lambda: torch.device("cpu"))


def _predictor(**kwargs) -> CamPredictor:
    torch.manual_seed(0)  # get_model's random init: the same weights in every predictor
    options = {"method": "cam", "threshold": 0.2, "target": "predicted", "run_id": "run-1"} | kwargs
    return CamPredictor(ModelSpec(arch="resnet18", classes=CLASSES, input_size=SIZE), **options)


def _normalized(pixels: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def test_rows_in_maps_out_and_bad_rows_pass_through():
    predictor = _predictor()
    count = 12
    batch = _batch(count, bad_rows={3}, skipped_rows={7})
    table = predictor(batch)
    assert table.schema == RESULT_SCHEMA and table.num_rows == count
    rows = table.to_pylist()
    assert rows[3]["error_type"] == "decode_error" and rows[3]["cam"] is None and rows[3]["width"] is None
    assert rows[7]["skipped"] and rows[7]["cam"] is None
    assert rows[3]["probs"] is None and rows[7]["probs"] is None  # no model output for them
    # heatmap and boxes are the localize stage's job
    assert all(r["heatmap_png"] is None and r["boxes"] is None for r in rows)

    good = [r for r in range(count) if r not in (3, 7)]
    # The oracle: the model as loaded (the predictor's has its BatchNorms folded).
    torch.manual_seed(0)
    unprepared = ModelSpec(arch="resnet18", classes=CLASSES, input_size=SIZE).load().model
    with build_extractor("cam", unprepared) as extractor, torch.no_grad():
        oracle = extractor(_normalized(batch["pixels"][good]))
    for i, r in enumerate(good):
        row = rows[r]
        cam = np.asarray(row["cam"], np.float32).reshape(row["cam_height"], row["cam_width"])
        np.testing.assert_allclose(cam, oracle.maps[i].numpy(), rtol=1e-4, atol=1e-5)
        assert row["pred_index"] == int(oracle.logits[i].argmax()) == row["target_index"]
        assert (row["width"], row["height"], row["run_id"]) == (600, 450, "run-1") and row[
            "threshold"
        ] == pytest.approx(0.2)
        assert row["pred_label"] == CLASSES[row["pred_index"]] and 1 / 3 <= row["pred_score"] <= 1
        # probs: the softmax of the unprepared model's logits, in CLASSES' order
        probs = np.asarray(row["probs"], np.float32)
        np.testing.assert_allclose(probs, torch.softmax(oracle.logits[i], dim=0).numpy(), rtol=1e-4, atol=1e-6)
        assert row["pred_score"] == probs.max() and row["pred_index"] == int(probs.argmax())


def test_read_only_pixels_as_ray_hands_them_over_run_quietly_in_channels_last():
    predictor = _predictor()
    batch = _batch(4)
    batch["pixels"].setflags(write=False)  # zero-copy from the object store
    seen = []
    predictor.model.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = predictor(batch)
    assert table.num_rows == 4 and all(r["cam"] is not None for r in table.to_pylist())
    assert len(seen) == 1 and seen[0].is_contiguous(memory_format=torch.channels_last)
    assert predictor.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)


class _OutOfMemoryAbove:
    """An extractor that fails like a GPU that fits at most `limit` images per forward pass."""

    def __init__(self, extractor, limit: int):
        self.extractor, self.limit, self.sizes = extractor, limit, []

    def __call__(self, images, target=None):
        self.sizes.append(len(images))
        if len(images) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.extractor(images, target=target)


def test_batch_that_does_not_fit_is_split_in_halves_and_gives_the_same_rows():
    whole = _predictor()(_batch(20))
    predictor = _predictor()
    predictor.extractor = _OutOfMemoryAbove(predictor.extractor, limit=6)
    split = predictor(_batch(20))
    # 20 fails, 10 fails, then pieces of 5; the next batch starts at 5 straight away.
    assert predictor.extractor.sizes == [20, 10, 5, 5, 5, 5]
    assert predictor.max_chunk == 5
    for name in ("cam", "pred_index", "target_index", "pred_score", "probs"):
        np.testing.assert_allclose(
            np.array(split.column(name).to_pylist(), dtype=float),
            np.array(whole.column(name).to_pylist(), dtype=float),
            rtol=1e-5,
            atol=1e-6,
        )
    predictor.extractor.sizes.clear()
    predictor(_batch(7))
    assert predictor.extractor.sizes == [5, 2]


def test_out_of_memory_on_a_single_image_is_raised():
    predictor = _predictor()
    predictor.extractor = _OutOfMemoryAbove(predictor.extractor, limit=0)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        predictor(_batch(3))


def test_precision_choice():
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert autocast_dtype("fp32", torch.device("cuda")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        autocast_dtype("fp8", torch.device("cpu"))


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_bf16_forward_pass_still_gives_float32_maps_close_to_fp32(method):
    batch = _batch(4)
    fp32 = _predictor(method=method)(batch)
    bf16 = _predictor(method=method, precision="bf16")(batch)
    for a, b in zip(fp32.column("cam").to_pylist(), bf16.column("cam").to_pylist()):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 0.1 * np.abs(a).max() + 1e-6  # bf16 keeps ~3 significant digits
    assert bf16.schema.field("cam").type == pa.list_(pa.float32())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_gpu_rows_match_the_cpu_rows(method, monkeypatch):
    """The GPU path (pinned copies, channels_last, autocast) against the plain CPU path."""
    batch = _batch(40)
    monkeypatch.setattr(camjobs.pipeline.predictor, "choose_device", lambda: torch.device("cuda"))
    gpu_fp32 = _predictor(method=method, precision="fp32")(batch)
    gpu_bf16 = _predictor(method=method)(batch)  # auto: bf16 on the GPU
    monkeypatch.setattr(camjobs.pipeline.predictor, "choose_device", lambda: torch.device("cpu"))
    cpu = _predictor(method=method)(batch)
    # cuDNN convolutions use TF32 by default, so "fp32" on the GPU is close, not equal; a near-tie
    # between two classes may flip.
    same = np.equal(gpu_fp32.column("pred_index").to_pylist(), cpu.column("pred_index").to_pylist())
    assert same.mean() >= 0.9
    for other in (gpu_fp32, gpu_bf16):
        probs = np.array(other.column("probs").to_pylist(), np.float32)
        np.testing.assert_array_equal(probs.max(axis=1), np.array(other.column("pred_score"), np.float32))
        np.testing.assert_allclose(probs, np.array(cpu.column("probs").to_pylist()), atol=0.05)
    for other, tolerance in ((gpu_fp32, 0.02), (gpu_bf16, 0.1)):
        compared = 0
        for a, b in zip(cpu.to_pylist(), other.to_pylist()):
            if a["target_index"] != b["target_index"]:
                continue  # maps of different classes
            compared += 1
            cam_a, cam_b = np.asarray(a["cam"]), np.asarray(b["cam"])
            assert np.abs(cam_a - cam_b).max() <= tolerance * np.abs(cam_a).max() + 1e-6
        assert compared >= 0.8 * len(batch["image_id"])


def test_encoded_rows_are_decoded_in_the_actor_like_the_decode_stage(tmp_path):
    """--decode-on gpu: the decode stage passes bytes on; the actor decodes them (here on the CPU
    device, the same code as on a GPU) and gives the maps the decode stage's pixels give."""
    import cv2

    from camjobs.pipeline.decode import decode_batch

    rng = np.random.default_rng(5)
    names = []
    for i in range(6):
        image = cv2.GaussianBlur(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8), (0, 0), 4)
        path = tmp_path / f"ISIC_{i:07d}.{'png' if i == 4 else 'jpg'}"
        cv2.imwrite(str(path), image)
        names.append(path)
    names[5].write_bytes(names[5].read_bytes()[:3000])  # truncated: header fine, pixels not
    listed = {
        "image_id": np.array([p.stem for p in names], dtype=object),
        "source_path": np.array([str(p) for p in names], dtype=object),
        "label": np.array([None] * 6, dtype=object),
        "error_type": np.array([None] * 6, dtype=object),
        "error_message": np.array([None] * 6, dtype=object),
    }

    def to_numpy(table):
        return {name: np.array(table.column(name).to_pylist(), dtype=object) for name in table.column_names}

    on_cpu = to_numpy(decode_batch(listed, input_size=SIZE))
    on_cpu["pixels"] = decode_batch(listed, input_size=SIZE)["pixels"].combine_chunks().to_numpy_ndarray()
    on_device = to_numpy(decode_batch(listed, input_size=SIZE, decode_on="gpu"))
    for batch in (on_cpu, on_device):
        batch["skipped"] = batch["skipped"].astype(bool)
    expected, got = _predictor()(on_cpu).to_pylist(), _predictor()(on_device).to_pylist()
    assert expected[5]["error_type"] == got[5]["error_type"] == "decode_error" and got[5]["cam"] is None
    assert str(names[5]) in got[5]["error_message"]
    for want, row in zip(expected[:5], got[:5]):
        assert row["error_type"] is None and (row["width"], row["height"]) == (want["width"], want["height"]) == (
            400,
            300,
        )
        np.testing.assert_allclose(
            row["cam"], want["cam"], rtol=0, atol=0.1 * np.abs(want["cam"]).max()
        )  # inputs within ~1 grey level
        assert np.corrcoef(row["cam"], want["cam"])[0, 1] > 0.98
