"""What training reads: a layout's labelled images, their lesion groups, the split and the sampler.

- Records: the images of the listing that have a label and no error; the classes are the
  layout's vocabulary, in its order, restricted to those present.
- Groups: the lesion (patient for ISIC 2020; lesion, else patient for the ISIC Archive) of each
  image, read from the CSV that the layout's spec names (``camjobs.layouts.group_source``); the
  split keeps every group on one side.
- Sampling: class-balanced draws with replacement (weights 1 / class count), anew each epoch
  from (seed, epoch), sharded over data-parallel ranks.

Nothing here knows about the training loop or Ray.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import posixpath
import random

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import torch
from torch.utils.data import Dataset, Sampler, WeightedRandomSampler

from camjobs.errors import UsageError
from camjobs.images import ImageInputError, load_image
from camjobs.layouts import ImageRecord, group_source, layouts_named_at, list_images
from camjobs.models.networks import IMAGENET_MEAN, IMAGENET_STD
from camjobs.storage import open_filesystem

log = logging.getLogger(__name__)


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
        try:
            pixels = torch.from_numpy(load_image(record.source_path, input_size=self.input_size).pixels)
        except ImageInputError as error:
            raise ValueError(f"cannot train on {record.image_id} ({error.error_type}): {error}") from error
        image = (pixels.permute(2, 0, 1).float() / 255.0 - self.mean) / self.std
        if self.augment:
            # Dermoscopy has no canonical orientation: flips are label-preserving.
            if random.random() < 0.5:
                image = image.flip(2)
            if random.random() < 0.5:
                image = image.flip(1)
        return image, self.class_index[record.label]


def labelled_listing(
    data: str, layout: str = "auto", label_column: str | None = None
) -> tuple[list[ImageRecord], list[str], str]:
    """(records, classes, layout): the usable records of the dataset at `data`, and the layout found;
    label_column: where the layout lets one choose (--label-column), the column that holds the labels."""
    listing = list_images(data, layout, label_column=label_column)
    records = [r for r in listing.records if r.error_type is None and r.label is not None]
    present = {r.label for r in records}
    vocabulary = listing.classes or sorted(present)
    classes = [c for c in vocabulary if c in present]
    if len(classes) < 2:
        raise _too_few_classes(data, listing.layout, len(records), len(classes))
    return records, classes, listing.layout


class TrainingDataError(UsageError, ValueError):
    """A dataset training cannot learn from: no labels, or fewer than two classes."""


def _too_few_classes(data: str, layout: str, labelled: int, classes: int) -> TrainingDataError:
    """What is wrong with --data for training, and which folder to give instead."""
    if layout != "folder":
        return TrainingDataError(
            f"--data {data} reads as the {layout} layout, with {labelled} labelled image(s) of {classes} class(es): "
            "training needs labelled images of at least 2 classes"
        )
    above = _labelled_root_above(data)
    hint = (
        f"give the dataset's root instead: {above[0]} (the {above[1]} layout, with labels)"
        if above
        else "give the dataset's root folder as downloaded, with its labels: e.g. HAM10000's folder that holds "
        "HAM10000_metadata.csv, or ISIC 2017's that holds ISIC-2017_Training_Part3_GroundTruth.csv (README: "
        "Real datasets)"
    )
    return TrainingDataError(
        f"--data {data} reads as the folder layout (images without labels), and training needs labels; {hint}"
    )


def _labelled_root_above(data: str, levels: int = 2) -> tuple[str, str] | None:
    """(folder, layout) of the nearest local folder above `data` whose names are those of a layout with labels
    (an images folder's dataset root), or None."""
    if "://" in data:
        return None
    folder = os.path.abspath(data)
    for _ in range(levels):
        folder = os.path.dirname(folder)
        found = layouts_named_at(folder)
        if len(found) == 1:
            return folder, found[0]
    return None


def usable_records(
    data: str, layout: str = "auto", label_column: str | None = None
) -> tuple[list[ImageRecord], list[str]]:
    """(records, classes) of labelled_listing."""
    records, classes, _ = labelled_listing(data, layout, label_column)
    return records, classes


def lesion_groups(records: list[ImageRecord], layout: str) -> dict[str, str]:
    """image_id -> group: the lesion (patient for ISIC 2020) from the layout's metadata CSV.

    An image's group is the first non-empty cell of the source's group column and its fallback
    columns (the ISIC Archive: lesion_id, else patient_id). Images the CSV does not name, or names
    with no such cell, and every image of a layout without such a CSV, are groups of their own.
    The dataset root lies the source's image_depth folders above an image's folder.
    """
    groups = {r.image_id: f"image:{r.image_id}" for r in records}
    source = group_source(layout)
    if source is None or not records:
        return groups
    root = posixpath.dirname(records[0].source_path)
    for _ in range(source.image_depth):
        root = posixpath.dirname(root)
    for name in source.csvs:
        fs, path = open_filesystem(posixpath.join(root, name))
        if fs.get_file_info(path).type != pafs.FileType.File:
            continue
        with fs.open_input_stream(path) as stream:
            table = pd.read_csv(stream, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        table.columns = [str(c).strip() for c in table.columns]
        id_column = source.id_column
        columns = [c for c in (source.group_column, *source.fallback_columns) if c in table.columns]
        if id_column not in table.columns or not columns:
            wanted = "/".join(repr(c) for c in (id_column, source.group_column, *source.fallback_columns))
            log.warning("%s has no %s columns: every image is its own group in the split", name, wanted)
            return groups
        for image_id, *cells in zip(table[id_column].str.strip(), *(table[c].str.strip() for c in columns)):
            found = next((f"{column}:{cell}" for column, cell in zip(columns, cells) if cell), None)
            if found and image_id in groups:
                groups[image_id] = found
        return groups
    log.info("no %s next to the images: every image is its own group in the split", " or ".join(source.csvs))
    return groups


def split_records(
    records: list[ImageRecord], val_fraction: float, seed: int, groups: dict[str, str] | None = None
) -> tuple[list, list]:
    """Split into (train, validation) by group: all images of a group land on the same side.

    groups maps image_id -> group (lesion_groups); without it every image is its own group.
    Stratified by class at group level (a group's class is its first image's, by image_id): per
    class, the groups in an order shuffled by `seed` go to validation until the class has
    round(val_fraction * its images) validation images (at least 1), always leaving one group in
    training. Deterministic for a seed.
    """
    groups = groups or {}
    members: dict[str, list[ImageRecord]] = {}
    for record in sorted(records, key=lambda r: r.image_id):
        members.setdefault(groups.get(record.image_id, f"image:{record.image_id}"), []).append(record)
    by_class: dict[str, list[str]] = {}
    for name, group in members.items():
        by_class.setdefault(group[0].label, []).append(name)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_class):
        names = sorted(by_class[label])
        rng.shuffle(names)
        wanted = max(1, round(val_fraction * sum(len(members[n]) for n in names))) if val_fraction > 0 else 0
        taken = 0
        for i, name in enumerate(names):
            to_val = taken < wanted and i < len(names) - 1
            (val if to_val else train).extend(members[name])
            taken += len(members[name]) if to_val else 0
    return train, val


def split_sha256(train: list[ImageRecord], val: list[ImageRecord]) -> str:
    """A digest of which images are on which side: a resume must continue on the same split."""
    digest = hashlib.sha256()
    for side, records in (("train", train), ("val", val)):
        digest.update(f"{side}:{','.join(sorted(r.image_id for r in records))};".encode())
    return digest.hexdigest()


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one epoch on one rank: every epoch reseeds, so a resumed run draws as an unbroken one."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


class BalancedSampler(Sampler[int]):
    """Class-balanced indices for one rank of `world`, drawn anew each epoch (set_epoch).

    Every rank draws the same ceil(n / world) * world indices with torch's WeightedRandomSampler
    (weights 1 / class count, replacement=True) from a generator seeded with (seed, epoch), and
    keeps every world-th one starting at its rank. So the ranks together see one balanced
    resample of the n training images per epoch, each the same number of batches; with world=1
    this is exactly WeightedRandomSampler(weights, n, replacement=True).
    """

    def __init__(self, labels: list[int], seed: int, rank: int = 0, world: int = 1):
        counts = np.bincount(np.asarray(labels, dtype=np.int64))
        self.weights = torch.tensor([1.0 / counts[label] for label in labels], dtype=torch.double)
        self.seed, self.rank, self.world, self.epoch = seed, rank, world, 0
        self.per_rank = math.ceil(len(labels) / world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(epoch_seed(self.seed, self.epoch))
        drawn = list(
            WeightedRandomSampler(self.weights, self.per_rank * self.world, replacement=True, generator=generator)
        )
        return iter(drawn[self.rank :: self.world])

    def __len__(self) -> int:
        return self.per_rank
