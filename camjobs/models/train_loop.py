"""The training loop: TrainConfig, the epochs, their metrics and the resume file.

``train_epochs(job, world)`` runs in this process (``LocalWorld``) and in every Ray Train worker
(``camjobs.models.train_ray``); the world says which rank it is and how ranks talk to each other. After
every epoch the resume payload (the last epoch's model and optimizer, the best epoch so far, epoch, seed,
classes, config; weights_only-safe) is written, and every epoch reseeds Python, NumPy and torch from
(seed, epoch, rank), so a resumed run continues exactly as an uninterrupted one would.

The best epoch is the one with the highest validation balanced accuracy (``keeps``); its weights are what
``camjobs train`` writes as the checkpoint, while the resume file continues from the last epoch.

This module does not import Ray.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from camjobs.layouts import ImageRecord
from camjobs.models.networks import atomic_torch_save, build_model
from camjobs.models.train_data import BalancedSampler, LabelledImages, epoch_seed

log = logging.getLogger(__name__)

RESUME_SUFFIX = ".resume.pt"
RESUME_FORMAT = "camjobs-train-resume"
RESUME_VERSION = 2  # 2: the best epoch so far ("best")
# Settings that shape the training trajectory: a resume file written with other values is refused.
RESUME_KEYS = ("input_size", "batch_size", "lr", "weights", "seed", "val_fraction", "balanced", "workers", "pooling")


@dataclass
class TrainConfig:
    data: str
    out: str
    arch: str = "resnet18"  # torchvision name, "efficientnet_lite0", or "timm/NAME"
    epochs: int = 5
    input_size: int = 224
    batch_size: int = 32  # per worker
    lr: float = 1e-3
    layout: str = "auto"
    # isic-archive: the metadata.csv column of the labels (None: its default); a resume checks its classes and split
    label_column: str | None = None
    weights: str | None = None  # None (random), "imagenet", or a local weights file for arch
    seed: int = 0
    val_fraction: float = 0.2
    max_seconds: float | None = None  # stop after the epoch that crosses this budget
    progress: bool = True
    balanced: bool = True  # class-balanced sampling (with replacement)
    resume: bool = False  # continue from <out>.resume.pt
    workers: int = 0  # 0: train in this process; N >= 1: N data-parallel Ray Train workers
    address: str | None = None  # Ray cluster for workers (default: RAY_ADDRESS, else a new local one)
    storage_path: str | None = None  # Ray Train storage (default: a folder next to out, removed after success)
    pooling: str = "gap"  # before the classifier: "gap" (global average) or "gmp" (global max)


def resume_path(out: str | os.PathLike) -> str:
    return str(out) + RESUME_SUFFIX


# --------------------------------------------------------------------------- metrics
def confusion_matrix(labels, predictions, num_classes: int) -> torch.Tensor:
    """counts[true, predicted] as int64."""
    labels, predictions = torch.as_tensor(labels).long().cpu(), torch.as_tensor(predictions).long().cpu()
    counts = torch.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


def accuracy(confusion: torch.Tensor) -> float:
    total = int(confusion.sum())
    return float(confusion.trace()) / total if total else float("nan")


def balanced_accuracy(confusion: torch.Tensor) -> float:
    """Mean recall over the classes that have validation images (as sklearn's balanced_accuracy_score)."""
    support = confusion.sum(1)
    present = support > 0
    if not bool(present.any()):
        return float("nan")
    return float((confusion.diag()[present].double() / support[present].double()).mean())


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _confusion(model: torch.nn.Module, loader, num_classes: int, device) -> torch.Tensor:
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    with torch.inference_mode():
        for images, labels in loader:
            predictions = model(images.to(device)).argmax(1)
            confusion += confusion_matrix(labels, predictions, num_classes)
    return confusion


# --------------------------------------------------------------------------- seeds, resume files
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {key: _to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(value) for value in obj)
    return obj


# --------------------------------------------------------------------------- the kept epoch
BEST_METRIC = "val_balanced_accuracy"


def keeps(metrics: dict, best: dict | None) -> bool:
    """Whether an epoch's metrics replace the best epoch so far: a higher validation balanced accuracy.

    A tie keeps the earlier epoch (it got there with fewer updates). Without validation images the
    metric is NaN for every epoch: nothing to choose by, so the last epoch is kept.
    """
    if best is None or math.isnan(best[BEST_METRIC]):
        return True
    return metrics[BEST_METRIC] > best[BEST_METRIC]  # False for NaN


def best_record(metrics: dict, state_dict: dict) -> dict:
    """The best epoch as the resume file keeps it: its number, validation metrics and weights."""
    return {
        "epoch": int(metrics["epoch"]),
        "val_accuracy": float(metrics["val_accuracy"]),
        "val_balanced_accuracy": float(metrics["val_balanced_accuracy"]),
        "state_dict": state_dict,
    }


def _snapshot(model: torch.nn.Module) -> dict:
    """A CPU copy of the weights: training goes on changing the model's own tensors in place."""
    return {key: value.detach().to("cpu", copy=True) for key, value in _unwrap(model).state_dict().items()}


def _resume_payload(cfg: TrainConfig, classes, split_sha256, sizes, state, optimizer, epoch, history, best) -> dict:
    """Everything to continue training; tensors, dicts, lists, numbers and strings only (weights_only-safe).

    state is the last epoch's weights; best["state_dict"] is the same dict when the last epoch is the best,
    and torch.save writes shared tensors once."""
    return {
        "format": RESUME_FORMAT,
        "version": RESUME_VERSION,
        "arch": cfg.arch,
        "classes": list(classes),
        "input_size": int(cfg.input_size),
        "config": {key: getattr(cfg, key) for key in RESUME_KEYS},
        "seed": int(cfg.seed),  # every epoch reseeds from (seed, epoch, rank): no RNG state to restore
        "split_sha256": split_sha256,
        "train_images": sizes[0],
        "val_images": sizes[1],
        "epoch": int(epoch),  # epochs completed
        "history": [dict(entry) for entry in history],
        "state_dict": state,
        "optimizer": _to_cpu(optimizer.state_dict()) if optimizer is not None else None,
        "best": best,
    }


def read_resume(path: str | os.PathLike, cfg: TrainConfig, classes: list[str], split_sha256: str) -> dict:
    """The resume file's payload, or an error that says how it differs from this run."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"--resume: there is no resume file {str(path)!r} (one is written after every "
            "epoch); run without --resume to start over"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"--resume: {str(path)!r} is not a camjobs resume file ({type(error).__name__}: {error})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != RESUME_FORMAT:
        raise ValueError(f"--resume: {str(path)!r} is not a camjobs resume file")
    problems = []
    if payload["arch"] != cfg.arch:
        problems.append(f"arch {payload['arch']!r} (now {cfg.arch!r})")
    if list(payload["classes"]) != list(classes):
        problems.append(f"classes {payload['classes']!r} (now {classes!r})")
    defaults = {f.name: f.default for f in fields(TrainConfig)}  # for settings added since the file was written
    for key in RESUME_KEYS:
        written = payload["config"].get(key, defaults[key])
        if written != getattr(cfg, key):
            problems.append(f"{key} {written!r} (now {getattr(cfg, key)!r})")
    if payload["split_sha256"] != split_sha256:
        problems.append(f"other training/validation images ({payload['train_images']}/{payload['val_images']})")
    if problems:
        raise ValueError(
            f"--resume: {str(path)!r} was written with {'; '.join(problems)}; "
            "resume with the same data and settings, or run without --resume to start over"
        )
    if "best" not in payload:  # written before the best epoch was kept: the last one is the best known
        log.info("%s does not record a best epoch: epoch %d counts as the best so far", path, payload["epoch"])
        payload["best"] = best_record(payload["history"][-1], payload["state_dict"])
    return payload


# --------------------------------------------------------------------------- the training loop
class World(Protocol):
    """Where train_epochs runs: one rank of `size`, its device, and how ranks share results."""

    rank: int
    size: int
    device: torch.device

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module: ...
    def prepare_loader(self, loader: DataLoader) -> DataLoader: ...
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor: ...  # the sum over ranks, on the CPU
    def say(self, message: str) -> None: ...  # logged once, not once per rank
    def end_epoch(self, payload: dict | None, metrics: dict) -> None: ...  # payload: rank 0's, else None


class LocalWorld:
    """Training in this process: no collectives; the resume file is written after every epoch."""

    rank, size = 0, 1
    device = torch.device("cpu")

    def __init__(self, resume_file: str):
        self.resume_file = resume_file

    def prepare_model(self, model):
        return model

    def prepare_loader(self, loader):
        return loader

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def say(self, message: str) -> None:
        log.info("%s", message)

    def end_epoch(self, payload: dict, metrics: dict) -> None:
        atomic_torch_save(payload, self.resume_file)


def _start_model(cfg: TrainConfig, classes: list[str], start: dict, world: World):
    """(model, optimizer) as the start payload left them, the model prepared for the world."""
    with torch.random.fork_rng(devices=[]):  # the architecture only: its weights come from start
        model = build_model(cfg.arch, len(classes), pooling=cfg.pooling)
    model.load_state_dict(start["state_dict"])
    model = world.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    if start["optimizer"] is not None:
        optimizer.load_state_dict(start["optimizer"])
    return model, optimizer


def _loaders(
    cfg: TrainConfig,
    class_index: dict[str, int],
    train_records: list[ImageRecord],
    val_records: list[ImageRecord],
    world: World,
):
    """(sampler, train loader, validation loader) of this rank: its share of the draws and of the validation images."""
    train_set = LabelledImages(train_records, class_index, cfg.input_size, True)
    if cfg.balanced:
        sampler = BalancedSampler([class_index[r.label] for r in train_records], cfg.seed, world.rank, world.size)
    else:
        sampler = DistributedSampler(train_set, num_replicas=world.size, rank=world.rank, shuffle=True, seed=cfg.seed)
    train_loader = world.prepare_loader(DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler))
    val_set = LabelledImages(val_records[world.rank :: world.size], class_index, cfg.input_size, False)
    val_loader = world.prepare_loader(DataLoader(val_set, batch_size=cfg.batch_size))
    return sampler, train_loader, val_loader


def _train_one_epoch(model, optimizer, loader, world: World, desc: str, show: bool) -> torch.Tensor:
    """One pass over this rank's loader; returns (sum of losses, images) as float64."""
    model.train()
    loss_sum = torch.zeros(2, dtype=torch.float64)
    bar = tqdm(loader, desc=desc, disable=not show, leave=False)
    for images, labels in bar:
        images, labels = images.to(world.device), labels.to(world.device)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += torch.tensor([loss.item() * len(labels), len(labels)], dtype=torch.float64)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return loss_sum


def train_epochs(job: dict, world: World) -> dict:
    """Train from job["start"] up to cfg.epochs; return the last epoch's resume payload (rank 0's; the
    best epoch in it).

    job: config (TrainConfig fields), classes, train and val records, split_sha256, deadline,
    start (a resume payload: state_dict, optimizer or None, epoch, history, best or None). The same
    function runs in this process and in every Ray Train worker, so the best is chosen the same way.
    """
    cfg = TrainConfig(**job["config"])
    classes, train_records, val_records, start = job["classes"], job["train"], job["val"], job["start"]
    class_index = {name: i for i, name in enumerate(classes)}
    sizes = (len(train_records), len(val_records))
    model, optimizer = _start_model(cfg, classes, start, world)
    sampler, train_loader, val_loader = _loaders(cfg, class_index, train_records, val_records, world)

    history, payload, best = list(start["history"]), start, start["best"]
    for epoch in range(int(start["epoch"]), cfg.epochs):
        began = time.time()
        seed_everything(epoch_seed(cfg.seed, epoch, world.rank))
        sampler.set_epoch(epoch)
        loss_sum = _train_one_epoch(
            model, optimizer, train_loader, world, f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress and world.rank == 0
        )
        # each rank scores its share of the validation images with the plain module (no DDP
        # collectives: the shares differ in size), then the confusion matrices are summed
        confusion = world.all_reduce(_confusion(_unwrap(model), val_loader, len(classes), world.device))
        loss_sum = world.all_reduce(loss_sum)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": float(loss_sum[0] / loss_sum[1]) if loss_sum[1] else float("nan"),
            "val_accuracy": accuracy(confusion),
            "val_balanced_accuracy": balanced_accuracy(confusion),
            "seconds": round(time.time() - began, 3),
        }
        history.append(metrics)
        world.say(
            f"epoch {epoch + 1}/{cfg.epochs}: loss {metrics['train_loss']:.3f}, validation accuracy "
            f"{100 * metrics['val_accuracy']:.1f}%, "
            f"balanced accuracy {100 * metrics['val_balanced_accuracy']:.1f}%"
        )
        payload = None
        if world.rank == 0:  # every rank has the same metrics (summed above); rank 0 alone keeps weights
            state = _snapshot(model)
            best = best_record(metrics, state) if keeps(metrics, best) else best
            payload = _resume_payload(
                cfg, classes, job["split_sha256"], sizes, state, optimizer, epoch + 1, history, best
            )
        world.end_epoch(payload, metrics)
        out_of_time = job["deadline"] is not None and time.time() > job["deadline"]
        if float(world.all_reduce(torch.tensor([float(out_of_time)]))[0]) > 0:  # every rank stops together
            world.say(f"stopping after {epoch + 1} epoch(s): the {cfg.max_seconds:.0f} s budget is spent")
            break
    return payload
