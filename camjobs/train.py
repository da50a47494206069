"""Fine-tune a torchvision GAP classifier on a dataset layout and write a camjobs checkpoint.

Single process. The checkpoint holds everything `camjobs run` needs (arch, classes,
state_dict, input_size, mean, std) and loads with torch.load(weights_only=True).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from camjobs.decode import load_image
from camjobs.layouts import ImageRecord, list_images
from camjobs.models import IMAGENET_MEAN, IMAGENET_STD, build_model, save_checkpoint

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: str
    out: str
    arch: str = "resnet18"
    epochs: int = 5
    input_size: int = 224
    batch_size: int = 32
    lr: float = 1e-3
    layout: str = "auto"
    weights: str | None = None
    seed: int = 0
    val_fraction: float = 0.2
    max_seconds: float | None = None  # stop after the epoch that crosses this budget
    progress: bool = True


@dataclass
class TrainResult:
    checkpoint: str
    classes: list[str]
    epochs_run: int
    val_accuracy: float
    train_images: int
    val_images: int
    checkpoint_sha256: str


class LabelledImages(Dataset):
    """Decoded, resized, normalized images with class indices; flips when augmenting."""

    def __init__(self, records: list[ImageRecord], class_index: dict[str, int], input_size: int, augment: bool):
        self.records, self.class_index, self.input_size, self.augment = records, class_index, input_size, augment
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        pixels = torch.from_numpy(load_image(record.source_path, input_size=self.input_size).pixels)
        image = (pixels.permute(2, 0, 1).float() / 255.0 - self.mean) / self.std
        if self.augment:
            # Dermoscopy has no canonical orientation: flips are label-preserving.
            if random.random() < 0.5:
                image = image.flip(2)
            if random.random() < 0.5:
                image = image.flip(1)
        return image, self.class_index[record.label]


def split_records(records: list[ImageRecord], val_fraction: float, seed: int) -> tuple[list, list]:
    """A per-class random split, so every class is in validation when it can be."""
    rng = random.Random(seed)
    train, val = [], []
    by_class: dict[str, list[ImageRecord]] = {}
    for record in records:
        by_class.setdefault(record.label, []).append(record)
    for members in by_class.values():
        members = sorted(members, key=lambda r: r.image_id)
        rng.shuffle(members)
        cut = int(round(len(members) * val_fraction)) if len(members) > 1 else 0
        val.extend(members[:cut])
        train.extend(members[cut:])
    return train, val


def usable_records(cfg: TrainConfig) -> tuple[list[ImageRecord], list[str]]:
    listing = list_images(cfg.data, cfg.layout)
    records = [r for r in listing.records if r.error_type is None and r.label is not None]
    present = {r.label for r in records}
    vocabulary = listing.classes or sorted(present)
    classes = [c for c in vocabulary if c in present]
    if len(classes) < 2:
        raise ValueError(f"training needs labelled images of at least 2 classes; {cfg.data} has {len(records)} labelled images of {len(classes)} class(es)")
    return records, classes


def evaluate(model: torch.nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for images, labels in loader:
            correct += int((model(images).argmax(1) == labels).sum())
            total += len(labels)
    return correct / total if total else float("nan")


def train_model(cfg: TrainConfig) -> TrainResult:
    started = time.time()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    records, classes = usable_records(cfg)
    class_index = {name: i for i, name in enumerate(classes)}
    train_records, val_records = split_records(records, cfg.val_fraction, cfg.seed)
    model = build_model(cfg.arch, len(classes), weights=cfg.weights)
    train_loader = DataLoader(LabelledImages(train_records, class_index, cfg.input_size, True), batch_size=cfg.batch_size, shuffle=True)
    val_loader = DataLoader(LabelledImages(val_records, class_index, cfg.input_size, False), batch_size=cfg.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    log.info("training %s on %d images (%d validation), classes %s", cfg.arch, len(train_records), len(val_records), ", ".join(classes))

    val_accuracy, epochs_run = float("nan"), 0
    for epoch in range(cfg.epochs):
        model.train()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress, leave=False)
        for images, labels in bar:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        epochs_run = epoch + 1
        val_accuracy = evaluate(model, val_loader) if val_records else float("nan")
        log.info("epoch %d/%d: validation accuracy %.1f%%", epochs_run, cfg.epochs, 100 * val_accuracy)
        if cfg.max_seconds is not None and time.time() - started > cfg.max_seconds:
            log.info("stopping after %d epoch(s): the %.0f s budget is spent", epochs_run, cfg.max_seconds)
            break

    sha = save_checkpoint(cfg.out, model.eval(), arch=cfg.arch, classes=classes, input_size=cfg.input_size)
    return TrainResult(cfg.out, classes, epochs_run, val_accuracy, len(train_records), len(val_records), sha)
