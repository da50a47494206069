"""The probs column and `camjobs export --format isic-csv`.

A real run (real Ray, real photographs, a real checkpoint file) writes probs; they are checked
against the softmax of the same checkpoint's logits computed here with plain torchvision, and
the exported CSV is scored by the ISIC challenge's own scorer (isic-challenge-scoring) against
ground truth built from the photographs' real ISIC 2017 diagnoses. Hand-made outputs cover the
row choice and the refusals; the kept outputs of earlier schema versions cover old files.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from typer.testing import CliRunner

from camjobs.cli import app
from camjobs.config import RunConfig
from camjobs.errors import EXIT_OK, EXIT_USAGE
from camjobs.images import load_image
from camjobs.labels.isic_csv import decimal
from camjobs.models.networks import save_checkpoint
from camjobs.output import read_newest_cams
from camjobs.pipeline.job import run_job
from camjobs.schema import CAMS_SCHEMA, SCHEMA_VERSION

FIXTURES = Path(__file__).parent / "fixtures"
# The model's order on purpose differs from the ground truth's columns: the scorer matches by name.
MODEL_CLASSES = ["seborrheic_keratosis", "melanoma", "nevus"]
TRUTH_CLASSES = ["melanoma", "nevus", "seborrheic_keratosis"]
SIZE = 96


def _export(output: Path, to: Path):
    return CliRunner().invoke(app, ["export", "--output", str(output), "--format", "isic-csv", "--to", str(to)])


def _read_csv(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    with path.open(newline="") as handle:
        header, *rows = list(csv.reader(handle))
    return header, {row[0]: row[1:] for row in rows}


# --------------------------------------------------------------------------- a real run
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A resnet18 checkpoint whose head is scaled up, so that the probabilities spread out."""
    generator = torch.Generator().manual_seed(7)
    model = torchvision.models.resnet18(num_classes=len(MODEL_CLASSES))
    with torch.no_grad():
        model.fc.weight.copy_(torch.randn(model.fc.weight.shape, generator=generator) * 0.5)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(path, model.eval(), arch="resnet18", classes=MODEL_CLASSES, input_size=SIZE)
    return path


@pytest.fixture(scope="module")
def real_run(ray_cluster, isic2017_mini, checkpoint, tmp_path_factory):
    output = tmp_path_factory.mktemp("isic-run") / "out"
    cfg = RunConfig(data=str(isic2017_mini), output=str(output), checkpoint=str(checkpoint), batch_size=4)
    result = run_job(cfg)
    assert result.exit_code == EXIT_OK
    return output, result


@pytest.mark.slow
def test_probs_are_the_softmax_of_the_checkpoints_logits(real_run, checkpoint):
    output, result = real_run
    table = pq.read_table(output / "cams")
    assert table.schema.field("probs").type == pa.list_(pa.float32())
    summary = json.loads(Path(result.summary_path).read_text())
    assert summary["model"]["classes"] == MODEL_CLASSES and summary["schema_version"] == SCHEMA_VERSION == 4
    # The oracle: the checkpoint file read with torch and run by torchvision's resnet18 (BatchNorms unfolded).
    saved = torch.load(checkpoint, weights_only=True)
    network = torchvision.models.resnet18(num_classes=len(saved["classes"]))
    network.load_state_dict(saved["state_dict"])
    mean, std = (torch.tensor(saved[key]).view(1, 3, 1, 1) for key in ("mean", "std"))
    rows = table.to_pylist()
    assert len(rows) == 6
    spread = []
    for row in rows:
        pixels = load_image(row["source_path"], input_size=SIZE).pixels
        x = (torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255.0 - mean) / std
        with torch.no_grad():
            expected = torch.softmax(network.eval()(x), dim=1)[0].numpy()
        probs = np.asarray(row["probs"], np.float32)
        np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)
        assert abs(float(probs.sum()) - 1.0) < 1e-5
        assert row["pred_score"] == probs.max() and row["pred_index"] == int(probs.argmax())
        assert row["pred_label"] == saved["classes"][row["pred_index"]]
        spread.append(probs.max() - probs.min())
    assert max(spread) > 0.1  # the probabilities are far from uniform: a swapped column would show


def _truth_csv(isic2017_mini: Path, path: Path) -> pd.DataFrame:
    """ISIC 2017's task 3 ground truth (melanoma, seborrheic_keratosis flags) in the 2019 format:
    image, then one 0/1 column per class (both flags 0: nevus)."""
    flags = pd.read_csv(isic2017_mini / "ISIC-2017_Training_Part3_GroundTruth.csv")
    truth = pd.DataFrame({"image": flags.image_id})
    truth["melanoma"] = flags.melanoma.astype(float)
    truth["nevus"] = ((flags.melanoma == 0) & (flags.seborrheic_keratosis == 0)).astype(float)
    truth["seborrheic_keratosis"] = flags.seborrheic_keratosis.astype(float)
    truth.to_csv(path, index=False)
    return truth.set_index("image")


def _auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic: P(positive > negative), ties counting one half."""
    pairs = positive[:, None] - negative[None, :]
    return float((pairs > 0).mean() + 0.5 * (pairs == 0).mean())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The inplace keyword", "ignore:The 'verify_integrity' keyword")  # the scorer's
def test_isic_csv_export_is_scored_by_the_challenges_own_scorer(real_run, isic2017_mini, tmp_path, monkeypatch):
    scoring = pytest.importorskip(
        "isic_challenge_scoring", reason="isic-challenge-scoring (the dev extra) is not installed"
    )
    # isic-challenge-scoring 5.6 (the newest) calls DataFrame.applymap, which pandas 3 removed after
    # renaming it to DataFrame.map in pandas 2.1: give the old name back to the scorer.
    monkeypatch.setattr(pd.DataFrame, "applymap", pd.DataFrame.map, raising=False)
    output, _ = real_run
    exported = tmp_path / "predictions.csv"
    result = _export(output, exported)
    assert result.exit_code == EXIT_OK, result.output
    assert f"isic-csv: 6 images, classes {', '.join(MODEL_CLASSES)}" in result.output

    header, values = _read_csv(exported)
    assert header == ["image", *MODEL_CLASSES]
    cams = read_newest_cams(str(output), ["probs"]).to_pylist()
    assert sorted(values) == sorted(row["image_id"] for row in cams)
    for row in cams:  # every value the row's float32, exactly, as a plain decimal
        written = values[row["image_id"]]
        assert all("." in text and "e" not in text.lower() for text in written)
        np.testing.assert_array_equal(np.array(written, float).astype(np.float32), np.float32(row["probs"]))

    truth = _truth_csv(isic2017_mini, tmp_path / "truth.csv")
    probs = pd.DataFrame({row["image_id"]: row["probs"] for row in cams}, index=MODEL_CLASSES).T.loc[truth.index]
    predicted = probs.idxmax(axis=1)
    actual = truth.idxmax(axis=1)
    balanced_accuracy = np.mean([(predicted[actual == name] == name).mean() for name in TRUTH_CLASSES])
    metric = scoring.ClassificationMetric
    score = scoring.ClassificationScore.from_file(tmp_path / "truth.csv", exported, metric.BALANCED_ACCURACY)
    assert score.overall == pytest.approx(balanced_accuracy)
    for name in TRUTH_CLASSES:
        expected = _auc(probs[name][truth[name] == 1].to_numpy(), probs[name][truth[name] == 0].to_numpy())
        assert score.per_category.loc[name, "auc"] == pytest.approx(expected)
    auc = scoring.ClassificationScore.from_file(tmp_path / "truth.csv", exported, metric.AUC)
    assert auc.overall == pytest.approx(score.macro_average["auc"])


# --------------------------------------------------------------------------- hand-made outputs
OLD_RUN, NEW_RUN = "20240101T000000Z-aaaaaa", "20240202T000000Z-bbbbbb"


def _row(image_id: str, run_id: str, probs: list[float] | None) -> dict:
    row = {name: None for name in CAMS_SCHEMA.names}
    best = None if probs is None else int(np.argmax(probs))
    row.update(
        image_id=image_id,
        source_path=f"/data/{image_id}.jpg",
        content_sha256="0" * 64,
        width=10,
        height=10,
        pred_index=best,
        pred_score=None if probs is None else max(probs),
        probs=probs,
        run_id=run_id,
        schema_version=SCHEMA_VERSION,
    )
    return row


def _write_run(output: Path, run_id: str, rows: list[dict], classes: list[str] | None) -> None:
    (output / "cams" / run_id).mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=CAMS_SCHEMA), output / "cams" / run_id / "part-0.parquet")
    if classes is not None:
        (output / "runs").mkdir(exist_ok=True)
        (output / "runs" / f"{run_id}.json").write_text(json.dumps({"run_id": run_id, "model": {"classes": classes}}))


def test_newest_row_per_image_and_values_that_read_back_exactly(tmp_path):
    output = tmp_path / "out"
    _write_run(output, OLD_RUN, [_row("ISIC_1", OLD_RUN, [0.5, 0.5]), _row("ISIC_2", OLD_RUN, [0.9, 0.1])], ["b", "a"])
    tiny = float(np.float32(3e-30))
    _write_run(output, NEW_RUN, [_row("ISIC_1", NEW_RUN, [1.0, 0.0]), _row("ISIC_3", NEW_RUN, [tiny, 1.0])], ["b", "a"])
    result = _export(output, tmp_path / "p.csv")
    assert result.exit_code == EXIT_OK, result.output
    header, values = _read_csv(tmp_path / "p.csv")
    assert header == ["image", "b", "a"]
    assert values == {
        "ISIC_1": ["1.0", "0.0"],
        "ISIC_2": [decimal(0.9), decimal(0.1)],
        "ISIC_3": [decimal(tiny), "1.0"],
    }
    for text, value in ((decimal(0.9), 0.9), (decimal(tiny), tiny), (decimal(1 / 3), 1 / 3)):
        assert "e" not in text and np.float32(float(text)) == np.float32(value)
    # a column of whole numbers still reads as floats, as the scorer requires
    assert pd.read_csv(tmp_path / "p.csv")[["b", "a"]].dtypes.tolist() == [np.float64, np.float64]


@pytest.mark.parametrize(
    ("old_classes", "new_probs", "message"),
    [
        (["a", "b"], [0.2, 0.8], "run 20240202T000000Z-bbbbbb has no readable run summary"),
        (["b", "a"], [0.2, 0.8], "models with different classes"),
        (["a", "b"], None, "1 of 2 images have no probs"),
    ],
)
def test_rows_that_cannot_make_one_table_are_refused(tmp_path, old_classes, new_probs, message):
    output = tmp_path / "out"
    _write_run(output, OLD_RUN, [_row("ISIC_1", OLD_RUN, [0.5, 0.5])], old_classes)
    new_classes = None if "summary" in message else ["a", "b"]
    _write_run(output, NEW_RUN, [_row("ISIC_2", NEW_RUN, new_probs)], new_classes)
    result = _export(output, tmp_path / "p.csv")
    assert result.exit_code == EXIT_USAGE and message in result.output
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize("version", [1, 2, 3])
def test_outputs_of_every_schema_version_still_export(version, tmp_path):
    """Rows written before probs existed read as null probs: the box exports and the gallery
    work as before, and isic-csv names the images it has no probabilities for."""
    from camjobs.labels.viz import render_gallery

    output = FIXTURES / f"output-v{version}"
    probs = read_newest_cams(str(output), ["probs"])["probs"].to_pylist()
    assert len(probs) == 3 and all((p is None) == (version < 3) for p in probs)
    coco = CliRunner().invoke(
        app, ["export", "--output", str(output), "--format", "coco", "--to", str(tmp_path / "c.json")]
    )
    assert coco.exit_code == EXIT_OK and len(json.loads((tmp_path / "c.json").read_text())["images"]) == 3
    # every row reaches the drawing (the fixtures' source images are not kept: those are reported)
    gallery = render_gallery(str(output), tmp_path / "gallery", limit=3)
    drawn = [item.image_id for item in gallery.items] + [image_id for image_id, _ in gallery.failed]
    assert sorted(drawn) == sorted(read_newest_cams(str(output), [])["image_id"].to_pylist())
    result = _export(output, tmp_path / "p.csv")
    if version < 3:
        assert result.exit_code == EXIT_USAGE and "3 of 3 images have no probs" in result.output
    else:
        assert result.exit_code == EXIT_OK and _read_csv(tmp_path / "p.csv")[0] == ["image", "a", "b"]
