"""Fine-tune a GAP (or GMP) classifier on a dataset layout and write a camjobs checkpoint.

``train_model`` lists and splits the data (``camjobs.models.train_data``), runs the epochs
(``camjobs.models.train_loop``) here or on Ray Train workers (``camjobs.models.train_ray``), and writes the
checkpoint.

The checkpoint holds everything `camjobs run` needs (arch, classes, state_dict, input_size,
mean, std, pooling) and loads with torch.load(weights_only=True).

- Model: a torchvision architecture, ``efficientnet_lite0`` (camjobs[efficientnet]) or
  ``timm/NAME``; ``pooling="gmp"`` puts a global max pool where its global average pool was
  (Zhou et al. 2015's GAP-against-GMP comparison).
- Start: random weights, ImageNet weights (``weights="imagenet"``: torchvision's, downloaded;
  efficientnet_lite0's from its weights package; timm's from the local caches) or a local
  weights file (``weights=PATH``); the classifier is replaced for the dataset's classes.
- Split: by lesion (HAM10000, ISIC 2018, ISIC 2019) or patient (ISIC 2020) read from the layout's
  metadata CSV, so no lesion has images on both sides; stratified by class at group level.
- Sampling: class-balanced by default (draws with replacement, weights 1 / class count).
- Metrics: validation accuracy and balanced accuracy (mean per-class recall) every epoch.
- Kept epoch: the checkpoint holds the epoch with the highest validation balanced accuracy (the
  earlier on a tie; the last without validation images), and records which (``training``).
- Resume: after every epoch ``<out>.resume.pt`` is replaced atomically (the last epoch's model and
  optimizer, the best epoch so far, epoch, seed, classes, config; weights_only-safe). Every epoch
  reseeds Python, NumPy and torch from (seed, epoch, rank), so a resumed run continues exactly as an
  uninterrupted one would.
- Scale: ``workers=0`` trains in this process; ``workers=N`` runs N data-parallel Ray Train
  workers (DistributedDataParallel; one GPU each where the cluster has GPUs).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from camjobs.models.networks import atomic_torch_save, build_model, check_pooling, save_checkpoint
from camjobs.models.train_data import labelled_listing, lesion_groups, split_records, split_sha256
from camjobs.models.train_loop import (
    BEST_METRIC,
    LocalWorld,
    TrainConfig,
    read_resume,
    resume_path,
    seed_everything,
    train_epochs,
)

__all__ = ["TrainConfig", "TrainResult", "resume_path", "train_model"]

log = logging.getLogger(__name__)

# Below about a thousand images a network from random weights learns the training images rather than
# the lesions; ImageNet features transfer to dermoscopy, so a start from them is worth a warning.
RANDOM_START_MIN_IMAGES = 1000


@dataclass
class TrainResult:
    checkpoint: str
    classes: list[str]
    epochs_run: int  # epochs completed in all, counting those done before a resume
    val_accuracy: float
    train_images: int
    val_images: int
    checkpoint_sha256: str  # val_accuracy and val_balanced_accuracy are the checkpoint's: the kept epoch's
    val_balanced_accuracy: float = float("nan")
    resumed_from_epoch: int = 0
    resume_file: str = ""
    # per epoch: epoch, train_loss, val_accuracy, val_balanced_accuracy, seconds
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0  # the epoch the checkpoint holds
    kept_by: str = BEST_METRIC  # BEST_METRIC, or "last" where there were no validation images


def _check(cfg: TrainConfig) -> None:
    check_pooling(cfg.pooling)
    problems = []
    if cfg.epochs < 1:
        problems.append(f"epochs must be >= 1, got {cfg.epochs}")
    if cfg.batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.input_size < 16:
        problems.append(f"input_size must be >= 16, got {cfg.input_size}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        problems.append(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.workers < 0:
        problems.append(f"workers must be >= 0, got {cfg.workers}")
    if cfg.seed < 0:
        problems.append(f"seed must be >= 0, got {cfg.seed}")
    if problems:
        raise ValueError("; ".join(problems))


def _run_epochs(cfg: TrainConfig, job: dict, resume_file: str) -> dict:
    """The last epoch's resume payload: trained here, on Ray Train workers, or the start when no epoch is left."""
    start = job["start"]
    if int(start["epoch"]) >= cfg.epochs:
        log.info("the resume file has %d epoch(s) already: nothing to train", start["epoch"])
        return start
    if cfg.workers:
        from camjobs.models.train_ray import train_on_ray  # Ray only when workers are asked for

        return train_on_ray(cfg, job, resume_file)
    return train_epochs(job, LocalWorld(resume_file))


def train_model(cfg: TrainConfig) -> TrainResult:
    _check(cfg)
    started = time.time()
    seed_everything(cfg.seed)
    records, classes, layout = labelled_listing(cfg.data, cfg.layout, cfg.label_column)
    groups = lesion_groups(records, layout)
    train_records, val_records = split_records(records, cfg.val_fraction, cfg.seed, groups)
    split = split_sha256(train_records, val_records)
    resume_file = resume_path(cfg.out)
    if cfg.resume:
        start = read_resume(resume_file, cfg, classes, split)
        log.info("resuming from %s after epoch %d", resume_file, start["epoch"])
    else:
        # seeded above: a fresh head is reproducible
        model = build_model(cfg.arch, len(classes), weights=cfg.weights, pooling=cfg.pooling)
        start = {"state_dict": model.state_dict(), "optimizer": None, "epoch": 0, "history": [], "best": None}
    log.info(
        "training %s on %d images of %d lesion groups (%d validation), classes %s, %s sampling%s",
        cfg.arch,
        len(train_records),
        len({groups[r.image_id] for r in train_records}),
        len(val_records),
        ", ".join(classes),
        "class-balanced" if cfg.balanced else "uniform",
        f", {cfg.workers} Ray Train worker(s)" if cfg.workers else "",
    )
    if not cfg.resume:
        _warn_random_start(cfg, len(train_records))
    job = {
        "config": asdict(cfg),
        "classes": classes,
        "train": train_records,
        "val": val_records,
        "split_sha256": split,
        "start": start,
        "deadline": started + cfg.max_seconds if cfg.max_seconds is not None else None,
    }
    final = _run_epochs(cfg, job, resume_file)
    best, sha = _write_checkpoint(cfg, classes, final)
    if cfg.workers and int(final["epoch"]) > int(start["epoch"]):
        atomic_torch_save(final, resume_file)  # the callback wrote it already; this makes sure it is the last one
    return TrainResult(
        cfg.out,
        classes,
        int(final["epoch"]),
        best["val_accuracy"],
        len(train_records),
        len(val_records),
        sha,
        val_balanced_accuracy=best["val_balanced_accuracy"],
        resumed_from_epoch=int(start["epoch"]) if cfg.resume else 0,
        resume_file=resume_file,
        history=list(final["history"]),
        best_epoch=best["epoch"],
        kept_by=_kept_by(best),
    )


def _warn_random_start(cfg: TrainConfig, train_images: int) -> None:
    if cfg.weights is None and train_images < RANDOM_START_MIN_IMAGES:
        log.warning(
            "training %s from random weights on %d images: under %d images that rarely learns more than the "
            "training images themselves; start from pretrained weights with --weights imagenet (torchvision's, "
            "downloaded; --model efficientnet_lite0 --weights imagenet works offline) or --weights-file PATH",
            cfg.arch,
            train_images,
            RANDOM_START_MIN_IMAGES,
        )


def _kept_by(best: dict) -> str:
    return "last" if math.isnan(best[BEST_METRIC]) else BEST_METRIC


def _write_checkpoint(cfg: TrainConfig, classes: list[str], final: dict) -> tuple[dict, str]:
    """(best epoch, sha256): the checkpoint holds the best epoch's weights and says which epoch that is."""
    best = final["best"]
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg.arch, len(classes), pooling=cfg.pooling)
    model.load_state_dict(best["state_dict"])
    training = {
        "epoch": best["epoch"],
        "epochs_run": int(final["epoch"]),
        "kept_by": _kept_by(best),
        "val_accuracy": best["val_accuracy"],
        "val_balanced_accuracy": best["val_balanced_accuracy"],
    }
    sha = save_checkpoint(
        cfg.out,
        model.eval(),
        arch=cfg.arch,
        classes=classes,
        input_size=cfg.input_size,
        pooling=cfg.pooling,
        training=training,
    )
    return best, sha
