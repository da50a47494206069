"""camjobs train: a real short training run on a generated dataset, and its checkpoint."""

from __future__ import annotations

import torch

from camjobs.models import file_sha256, load_model
from camjobs.synth import synth_dataset
from camjobs.train import TrainConfig, split_records, train_model, usable_records


def test_train_writes_a_checkpoint_that_loads_safely(tmp_path):
    data = tmp_path / "ham"
    synth_dataset(data, n=24, seed=3, width=160, height=120)
    checkpoint = tmp_path / "model.pt"
    result = train_model(TrainConfig(data=str(data), out=str(checkpoint), arch="resnet18", epochs=1, input_size=64,
                                     batch_size=8, progress=False))
    assert result.classes == ["bkl", "mel", "nv"]  # HAM10000's order, only classes present
    assert result.train_images + result.val_images == 24 and result.val_images > 0
    assert 0.0 <= result.val_accuracy <= 1.0
    assert result.checkpoint_sha256 == file_sha256(checkpoint)
    stored = torch.load(checkpoint, weights_only=True)
    assert stored["arch"] == "resnet18" and stored["input_size"] == 64 and len(stored["mean"]) == 3
    loaded = load_model(str(checkpoint))
    assert loaded.classes == result.classes and loaded.model_sha256 == result.checkpoint_sha256
    assert loaded.model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)


def test_split_keeps_every_class_in_validation(tmp_path):
    data = tmp_path / "ham"
    synth_dataset(data, n=30, seed=1, width=80, height=60)
    records, classes = usable_records(TrainConfig(data=str(data), out="unused"))
    train, val = split_records(records, 0.2, seed=0)
    assert len(train) + len(val) == 30 and not {r.image_id for r in train} & {r.image_id for r in val}
    assert {r.label for r in val} == set(classes)
