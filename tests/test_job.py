"""End to end on a real local Ray cluster: real JPEG/PNG files in, real Parquet out."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
import torch
from layout_fixtures import noise_jpegs
from PIL import Image

from camjobs.config import RunConfig
from camjobs.errors import EXIT_ERROR_BUDGET, EXIT_OK
from camjobs.images import load_image
from camjobs.models.networks import IMAGENET_MEAN, IMAGENET_STD, load_model
from camjobs.output import OutputExists
from camjobs.pipeline.job import Tuning, plan_actors, run_job
from camjobs.schema import CAMS_SCHEMA, ERRORS_SCHEMA

pytestmark = pytest.mark.slow

ISIC2017_CLASSES = ["melanoma", "nevus", "seborrheic_keratosis"]


def _oracle_cam(model: torch.nn.Module, pixels: np.ndarray, target: int) -> np.ndarray:
    """sum_k w_k^c A^k straight from a resnet's layers, on the same preprocessed input."""
    x = torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        trunk = torch.nn.Sequential(
            model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3, model.layer4
        )
        features = trunk(x)[0]
        return torch.einsum("k,khw->hw", model.fc.weight[target], features).numpy()


@pytest.fixture(scope="module")
def real_run(ray_cluster, isic2017_mini, tmp_path_factory):
    output = tmp_path_factory.mktemp("real-run")
    cfg = RunConfig(
        data=str(isic2017_mini),
        output=str(output),
        model="resnet18",
        classes=ISIC2017_CLASSES,
        input_size=128,
        batch_size=4,
    )
    return cfg, run_job(cfg)


def test_real_photographs_cam_heatmap_and_boxes(real_run):
    cfg, result = real_run
    assert result.exit_code == EXIT_OK
    cams = pd.read_parquet(Path(cfg.output) / "cams")
    assert len(cams) == 6 and cams["image_id"].is_unique
    model = load_model(None, arch="resnet18", classes=ISIC2017_CLASSES, input_size=128).model.eval()
    for row in cams.itertuples():
        assert (row.width, row.height) == (800, 500)  # native size of the photographs
        image = load_image(row.source_path, input_size=128)
        cam = np.asarray(row.cam, dtype=np.float32).reshape(row.cam_height, row.cam_width)
        # The stored map is the CAM of the stored target, computed from the model directly.
        oracle = _oracle_cam(model, image.pixels, row.target_index)
        np.testing.assert_allclose(cam, oracle, rtol=1e-4, atol=1e-4 * np.abs(oracle).max())
        assert row.target_index == row.pred_index and row.target_label == row.pred_label

        # heatmap_png is the bilinear upsampling of the row's own cam, at full size.
        heatmap = cv2.imdecode(np.frombuffer(row.heatmap_png, np.uint8), cv2.IMREAD_UNCHANGED)
        assert heatmap.shape == (500, 800) and heatmap.dtype == np.uint8
        upsampled = cv2.resize(cam, (800, 500), interpolation=cv2.INTER_LINEAR)
        expected = np.floor(255 * np.clip(upsampled / upsampled.max(), 0, 1) + 0.5)
        assert np.abs(heatmap.astype(int) - expected).max() <= 1

        # boxes[0] is the box of the largest 8-connected component of {U >= 0.2 max U}.
        region = (upsampled >= 0.2 * upsampled.max()).astype(np.uint8)
        _, _, stats, _ = cv2.connectedComponentsWithStats(region, connectivity=8)
        x, y, w, h, _area = stats[1 + np.argmax(stats[1:, cv2.CC_STAT_AREA])]
        first = row.boxes[0]
        got = np.array([first["x_min"], first["y_min"], first["x_max"], first["y_max"]])
        assert np.abs(got - [x, y, x + w, y + h]).max() <= 1
        areas = [(b["x_max"] - b["x_min"]) * (b["y_max"] - b["y_min"]) for b in row.boxes]
        assert 0 <= first["x_min"] < first["x_max"] <= 800 and 0 <= first["y_min"] < first["y_max"] <= 500
        assert 0.2 <= first["score"] <= 1.0 and len(areas) >= 1


def test_real_run_schema_labels_and_summary(real_run):
    cfg, result = real_run
    table = pads.dataset(Path(cfg.output) / "cams", format="parquet").to_table()
    for field in CAMS_SCHEMA:
        assert table.schema.field(field.name).type == field.type, field.name
    errors = pads.dataset(Path(cfg.output) / "errors", format="parquet").to_table()
    assert errors.num_rows == 0 and errors.schema.names == ERRORS_SCHEMA.names
    rows = table.to_pandas()
    labels = dict(zip(rows.image_id, rows.label))
    assert (
        labels["ISIC_0014722"] == "melanoma"
        and labels["ISIC_0014628"] == "seborrheic_keratosis"
        and labels["ISIC_0014657"] == "nevus"
    )
    assert set(rows.method) == {"cam"} and set(rows.run_id) == {result.run_id}
    assert (rows.pred_score > 0).all() and (rows.pred_score <= 1).all()
    # without --refine the refinement's columns are null
    assert rows.mask_rle.isna().all() and rows.refined_boxes.isna().all() and rows.refine.isna().all()
    summary = json.loads(Path(result.summary_path).read_text())
    assert summary["counts"] == {
        "inputs": 6,
        "processed": 6,
        "skipped": 0,
        "skipped_fingerprint": 0,
        "skipped_hash": 0,
        "errors": 0,
    }
    assert summary["model"]["model_sha256"] == rows.model_sha256.iloc[0]
    assert summary["config"]["threshold"] == 0.2 and "ray" in summary["versions"]
    assert not (Path(cfg.output) / "_staging" / result.run_id).exists()


def _jpeg_bytes(array: np.ndarray, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", **save)
    return buffer.getvalue()


def _awkward_dataset(root: Path, real_jpeg: Path) -> dict[str, str | None]:
    """Valid-but-awkward images (None) and bad ones (their expected error code)."""
    rgb = np.asarray(Image.open(real_jpeg).convert("RGB").resize((160, 100)))
    expected: dict[str, str | None] = {}
    (root / "sub dir").mkdir(parents=True)
    Image.fromarray(rgb).save(root / "plain.jpg")
    Image.fromarray(rgb).save(root / "UPPER.JPG")
    Image.fromarray(rgb).convert("L").save(root / "grey.png")
    Image.fromarray(rgb).convert("RGBA").save(root / "alpha.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg")
    cv2.imwrite(str(root / "deep16.png"), (rgb[:, :, 0].astype(np.uint16) * 257))
    exif = Image.Exif()
    exif[0x0112] = 6
    (root / "rotated.jpg").write_bytes(_jpeg_bytes(rgb, exif=exif))
    Image.fromarray(rgb).save(root / "sub dir" / "Ünïcode naïve.jpeg")
    expected.update(
        dict.fromkeys(["plain", "UPPER", "grey", "alpha", "cmyk", "deep16", "rotated", "sub dir/Ünïcode naïve"])
    )
    (root / "empty.jpg").write_bytes(b"")
    good = _jpeg_bytes(rgb)
    (root / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "notes.png").write_bytes(b"name,value\nnot,an image\n")
    Image.new("RGB", (400, 300)).save(root / "huge.png")  # over the --max-pixels set below
    expected.update({"empty": "empty_file", "truncated": "decode_error", "notes": "decode_error", "huge": "too_large"})
    return expected


@pytest.mark.parametrize("decode_on", ["cpu", "gpu"])  # gpu: bytes to the actor, decoded there (on its CPU here)
def test_bad_inputs_accounted_exactly_once(ray_cluster, isic2017_mini, tmp_path, decode_on):
    data = tmp_path / "data"
    expected = _awkward_dataset(data, next((isic2017_mini / "ISIC-2017_Training_Data").glob("*.jpg")))
    output = tmp_path / "out"
    cfg = RunConfig(
        data=str(data),
        output=str(output),
        layout="folder",
        model="resnet18",
        classes=["a", "b"],
        input_size=64,
        max_pixels=100_000,
        batch_size=3,
        decode_on=decode_on,
    )
    result = run_job(cfg)
    cams = pd.read_parquet(output / "cams")
    errors = pd.read_parquet(output / "errors")
    assert sorted(cams.image_id) == sorted(k for k, v in expected.items() if v is None)
    assert dict(zip(errors.image_id, errors.error_type)) == {k: v for k, v in expected.items() if v is not None}
    assert errors.error_message.str.len().min() > 0 and set(errors.run_id) == {result.run_id}
    sizes = {row.image_id: (row.width, row.height) for row in cams.itertuples()}
    assert sizes["rotated"] == (100, 160) and sizes["plain"] == (160, 100)  # EXIF orientation respected
    # 4 of 12 failed: everything is written, and the exit code tells the scheduler.
    assert result.exit_code == EXIT_ERROR_BUDGET and "max-error-fraction" in result.message
    assert result.summary["counts"] == {
        "inputs": 12,
        "processed": 8,
        "skipped": 0,
        "skipped_fingerprint": 0,
        "skipped_hash": 0,
        "errors": 4,
    }


def test_listing_errors_reach_the_errors_table(ray_cluster, tmp_path):
    from layout_fixtures import make_ham10000

    data = tmp_path / "ham"
    make_ham10000(data, n=4)
    metadata = data / "HAM10000_metadata.csv"
    lines = metadata.read_text().splitlines()
    lines.append("HAM_0009998,ISIC_9999999,nv,histo,40.0,male,back")
    lines.append("HAM_0009999,../../etc/passwd,nv,histo,40.0,male,back")
    metadata.write_text("\n".join(lines) + "\n")
    output = tmp_path / "out"
    result = run_job(
        RunConfig(
            data=str(data),
            output=str(output),
            model="resnet18",
            classes=["nv", "mel"],
            input_size=64,
            max_error_fraction=0.5,
        )
    )
    errors = pd.read_parquet(output / "errors")
    assert dict(zip(errors.image_id, errors.error_type)) == {
        "ISIC_9999999": "missing_file",
        "../../etc/passwd": "invalid_path",
    }
    assert len(pd.read_parquet(output / "cams")) == 4
    assert result.exit_code == EXIT_OK and result.summary["counts"]["inputs"] == 6


def test_target_label_and_gradcam(ray_cluster, isic2017_mini, tmp_path):
    cfg = RunConfig(
        data=str(isic2017_mini),
        output=str(tmp_path),
        model="resnet18",
        classes=ISIC2017_CLASSES,
        input_size=96,
        method="gradcam",
        target="label",
    )
    run_job(cfg)
    cams = pd.read_parquet(tmp_path / "cams")
    assert (cams.target_label == cams.label).all()
    assert (cams.target_index == cams.label.map(ISIC2017_CLASSES.index)).all()
    assert set(cams.method) == {"gradcam"}
    assert all(min(c) >= 0 for c in cams.cam)  # Grad-CAM maps are ReLU'd


def test_runs_append_to_one_dataset_when_asked(ray_cluster, isic2017_mini, tmp_path):
    cfg = RunConfig(
        data=str(isic2017_mini), output=str(tmp_path), model="resnet18", classes=ISIC2017_CLASSES, input_size=64
    )
    first = run_job(cfg)
    with pytest.raises(OutputExists, match="--append"):  # the same again, without a write mode
        run_job(cfg)
    second = run_job(dataclasses.replace(cfg, append=True))
    cams = pd.read_parquet(tmp_path / "cams")
    assert len(cams) == 12 and set(cams.run_id) == {first.run_id, second.run_id}
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(
        [f"{first.run_id}.json", f"{second.run_id}.json"]
    )
    assert (first.summary["write_mode"], second.summary["write_mode"]) == ("error", "append")
    assert not (tmp_path / "_staging").exists()  # no empty _staging/ left once no run stages


def test_actor_plan_leaves_cpus_for_decoding():
    cfg = RunConfig(data="d", output="o", model="resnet18", classes=["a", "b"])
    plan = plan_actors(cfg, {"CPU": 2.0})
    assert plan.actors == 1 and plan.num_cpus <= 1.0 and plan.num_gpus == 0 and plan.torch_threads == 2
    gpu = plan_actors(cfg, {"CPU": 16.0, "GPU": 4.0})
    assert (gpu.actors, gpu.num_gpus, gpu.torch_threads, gpu.batch_size) == (4, 1.0, None, 256)
    # The GPU batch keeps images x pixels about constant: a 448 px model gets a quarter.
    assert plan_actors(cfg, {"CPU": 16.0, "GPU": 1.0}, input_size=448).batch_size == 64
    assert plan_actors(cfg, {"CPU": 16.0, "GPU": 1.0}, input_size=32).batch_size == 1024  # capped
    # decode tasks: 8 images each on CPUs; on GPUs larger, so that a batch gathers fewer blocks
    assert (plan.decode_rows, gpu.decode_rows) == (8, 32)
    small = RunConfig(data="d", output="o", model="resnet18", classes=["a"], batch_size=64)
    assert plan_actors(small, {"CPU": 16.0, "GPU": 1.0}).decode_rows == 8
    with pytest.raises(ValueError, match="GPUs"):
        plan_actors(RunConfig(data="d", output="o", model="resnet18", classes=["a"], gpus_per_actor=1), {"CPU": 2.0})
    # CPU stage tasks reserve a whole CPU; half a one where the actors leave less than one
    # (a 1-CPU machine); a GPU node whose CPUs the actors take all is refused, not left to hang.
    assert (plan.stage_cpus, gpu.stage_cpus) == (1.0, 1.0)
    tiny = plan_actors(cfg, {"CPU": 1.0})
    assert tiny.num_cpus + tiny.stage_cpus <= 1.0 and tiny.stage_cpus == 0.5
    assert plan_actors(cfg, {"CPU": 1.5, "GPU": 1.0}).stage_cpus == 0.5
    with pytest.raises(ValueError, match="none left for the decode"):
        plan_actors(cfg, {"CPU": 4.0, "GPU": 4.0})


def _recording_localize(log_path: str):
    """localize_batch that notes its Ray task and its rows for each call (it runs in Ray workers)."""
    from camjobs.pipeline.localize import localize_batch

    def recording_localize_batch(table, **options):
        import ray

        with open(log_path, "a") as log:
            log.write(f"{ray.get_runtime_context().get_task_id()} {table.num_rows}\n")
        return localize_batch(table, **options)

    return recording_localize_batch


def test_one_localize_task_per_model_batch_a_few_rows_at_a_time_with_small_heatmaps(ray_cluster, tmp_path):
    data = noise_jpegs(tmp_path / "data", 80, size=(45, 60))
    log_path = tmp_path / "localize-rows.txt"
    recording = _recording_localize(str(log_path))

    def record_localize(stages):
        return [dataclasses.replace(s, fn=recording) if s.name == "localize" else s for s in stages]

    cfg = RunConfig(
        data=str(data),
        output=str(tmp_path / "out"),
        layout="folder",
        model="resnet18",
        classes=["a", "b"],
        input_size=32,
        batch_size=40,
        heatmap_max_side=30,
    )
    result = run_job(cfg, tuning=Tuning(localize_rows=16), adapt=record_localize)
    rows_per_task: dict[str, list[int]] = {}
    for line in log_path.read_text().splitlines():
        task, rows = line.split()
        rows_per_task.setdefault(task, []).append(int(rows))
    # Each model batch of 40 rows is one localize task (no split between), localized 16 rows at a time.
    assert sorted(sum(rows) for rows in rows_per_task.values()) == [40, 40]
    assert all(sorted(rows) == [8, 16, 16] for rows in rows_per_task.values())
    cams = pd.read_parquet(tmp_path / "out" / "cams")
    assert result.summary["counts"]["processed"] == 80 and len(cams) == 80
    # --heatmap-max-side reaches the localize stage: 60x45 images, 30x22 heatmaps, full-size boxes
    shapes = {cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED).shape for png in cams.heatmap_png}
    assert shapes == {(22, 30)}
    assert all(0 <= b["x_min"] < b["x_max"] <= 60 and b["y_max"] <= 45 for boxes in cams.boxes for b in boxes)


def test_uris_for_data_and_output(ray_cluster, isic2017_mini, tmp_path):
    """file:// URIs go through pyarrow.fs like s3:// or gs:// would, for reading and writing."""
    cfg = RunConfig(
        data=isic2017_mini.as_uri(),
        output=(tmp_path / "out").as_uri(),
        model="resnet18",
        classes=ISIC2017_CLASSES,
        input_size=64,
    )
    result = run_job(cfg)
    assert result.summary["counts"]["processed"] == 6
    cams = pd.read_parquet(tmp_path / "out" / "cams")
    assert len(cams) == 6 and cams.source_path.str.startswith(str(isic2017_mini)).all()


@pytest.mark.parametrize("decode_on", ["cpu", "gpu"])
def test_refine_run_masks_real_lesions_and_is_a_setting_of_incremental(ray_cluster, isic2017_mini, tmp_path, decode_on):
    """--refine on real dermoscopy: masks at each image's size, decodable by pycocotools, that
    cover the lesion (a floor no run without the refinement reaches: its masks are null);
    boxes unchanged; and --incremental reprocesses what was written without --refine."""
    from pycocotools import mask as coco_mask

    from camjobs.geometry import mask_box, mask_jaccard
    from camjobs.pipeline.localize import boxes_from_normalized, normalized, upsample
    from camjobs.segment import REFINE_METHOD

    base = dict(
        data=str(isic2017_mini),
        output=str(tmp_path),
        model="resnet18",
        classes=ISIC2017_CLASSES,
        input_size=64,
        incremental=True,
        decode_on=decode_on,
    )
    plain = run_job(RunConfig(**base))
    refined = run_job(RunConfig(**base, refine=True))
    again = run_job(RunConfig(**base, refine=True))
    assert refined.summary["counts"] == {
        "inputs": 6,
        "processed": 6,
        "skipped": 0,
        "skipped_fingerprint": 0,
        "skipped_hash": 0,
        "errors": 0,
        "refine_failed": 0,
    }
    assert refined.summary["settings"]["refine"] == REFINE_METHOD and plain.summary["settings"]["refine"] is None
    assert again.summary["counts"]["skipped"] == 6 and again.summary["counts"]["processed"] == 0
    cams = pd.read_parquet(tmp_path / "cams")
    old = cams[cams.run_id == plain.run_id].set_index("image_id")
    new = cams[cams.run_id == refined.run_id].set_index("image_id")
    assert old.mask_rle.isna().all() and (new.refine == REFINE_METHOD).all()
    jaccards = []
    for image_id, row in new.iterrows():
        truth = (
            cv2.imread(
                str(isic2017_mini / "ISIC-2017_Training_Part1_GroundTruth" / f"{image_id}_segmentation.png"),
                cv2.IMREAD_GRAYSCALE,
            )
            > 127
        )
        rle = {"size": list(row.mask_rle["size"]), "counts": row.mask_rle["counts"].encode()}
        mask = coco_mask.decode(rle).astype(bool)
        assert mask.shape == (row.height, row.width) == truth.shape
        first = row.refined_boxes[0]
        assert (first["x_min"], first["y_min"], first["x_max"], first["y_max"]) == mask_box(mask)  # one component
        # boxes keep the 20% rule on the row's own map (a larger decode for the working image
        # may move the 64 px model input, hence the map, by a rounding)
        cam = np.asarray(row.cam, np.float32).reshape(row.cam_height, row.cam_width)
        rule = [b.as_dict() for b in boxes_from_normalized(normalized(upsample(cam, row.height, row.width)), 0.2)]
        assert len(row.boxes) == len(rule)
        for got, want in zip(row.boxes, rule):
            assert dict(got) == pytest.approx(want, rel=1e-6)
        jaccards.append(mask_jaccard(mask, truth))
    assert np.mean(jaccards) >= 0.6, jaccards
