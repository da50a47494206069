"""Fine-tune a GAP (or GMP) classifier on a dataset layout and write a camjobs checkpoint.

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
- Resume: after every epoch ``<out>.resume.pt`` is replaced atomically (model, optimizer, epoch,
  seed, classes, config; weights_only-safe). Every epoch reseeds Python, NumPy and torch from
  (seed, epoch, rank), so a resumed run continues exactly as an uninterrupted one would.
- Scale: ``workers=0`` trains in this process; ``workers=N`` runs N data-parallel Ray Train
  workers (DistributedDataParallel; one GPU each where the cluster has GPUs).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import posixpath
import random
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from camjobs.decode import ImageInputError, load_image
from camjobs.layouts import ImageRecord, list_images
from camjobs.models import IMAGENET_MEAN, IMAGENET_STD, atomic_torch_save, build_model, check_pooling, save_checkpoint
from camjobs.storage import open_filesystem

log = logging.getLogger(__name__)

RESUME_SUFFIX = ".resume.pt"
RESUME_FORMAT = "camjobs-train-resume"
RESUME_VERSION = 1
RESUME_NAME = "resume.pt"  # the file inside a Ray Train checkpoint folder
# Settings that shape the training trajectory: a resume file written with other values is refused.
RESUME_KEYS = ("input_size", "batch_size", "lr", "weights", "seed", "val_fraction", "balanced", "workers", "pooling")

# Where each layout keeps its lesion (or patient) ids: metadata CSV candidates relative to the
# dataset root (the first that exists is read), the image id column and the group column.
GROUP_SOURCES = {
    "ham10000": (("HAM10000_metadata.csv",), "image_id", "lesion_id"),
    "isic2018": (("ISIC2018_Task3_Training_LesionGroupings.csv",), "image", "lesion_id"),
    "isic2019": (("ISIC_2019_Training_Metadata.csv",), "image", "lesion_id"),
    "isic2020": (("ISIC_2020_Training_GroundTruth_v2.csv", "ISIC_2020_Training_GroundTruth.csv"), "image_name", "patient_id"),
}


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


@dataclass
class TrainResult:
    checkpoint: str
    classes: list[str]
    epochs_run: int  # epochs completed in all, counting those done before a resume
    val_accuracy: float
    train_images: int
    val_images: int
    checkpoint_sha256: str
    val_balanced_accuracy: float = float("nan")
    resumed_from_epoch: int = 0
    resume_file: str = ""
    history: list[dict] = field(default_factory=list)  # per epoch: epoch, train_loss, val_accuracy, val_balanced_accuracy, seconds


def resume_path(out: str | os.PathLike) -> str:
    return str(out) + RESUME_SUFFIX


# --------------------------------------------------------------------------- data
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


def _listing(cfg: TrainConfig) -> tuple[list[ImageRecord], list[str], str]:
    listing = list_images(cfg.data, cfg.layout)
    records = [r for r in listing.records if r.error_type is None and r.label is not None]
    present = {r.label for r in records}
    vocabulary = listing.classes or sorted(present)
    classes = [c for c in vocabulary if c in present]
    if len(classes) < 2:
        raise ValueError(f"training needs labelled images of at least 2 classes; {cfg.data} has {len(records)} labelled images of {len(classes)} class(es)")
    return records, classes, listing.layout


def usable_records(cfg: TrainConfig) -> tuple[list[ImageRecord], list[str]]:
    records, classes, _ = _listing(cfg)
    return records, classes


def lesion_groups(records: list[ImageRecord], layout: str) -> dict[str, str]:
    """image_id -> group: the lesion (patient for ISIC 2020) from the layout's metadata CSV.

    Images the CSV does not name, or names with an empty id, and every image of a layout without
    such a CSV, are groups of their own. The dataset root is the parent of an image's folder
    (every layout with groups keeps its images one folder below the root).
    """
    groups = {r.image_id: f"image:{r.image_id}" for r in records}
    source = GROUP_SOURCES.get(layout)
    if source is None or not records:
        return groups
    names, id_column, group_column = source
    root = posixpath.dirname(posixpath.dirname(records[0].source_path))
    for name in names:
        fs, path = open_filesystem(posixpath.join(root, name))
        if fs.get_file_info(path).type != pafs.FileType.File:
            continue
        with fs.open_input_stream(path) as stream:
            table = pd.read_csv(stream, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        table.columns = [str(c).strip() for c in table.columns]
        if id_column not in table.columns or group_column not in table.columns:
            log.warning("%s has no %r/%r columns: every image is its own group in the split", name, id_column, group_column)
            return groups
        for image_id, group in zip(table[id_column].str.strip(), table[group_column].str.strip()):
            if group and image_id in groups:
                groups[image_id] = f"{group_column}:{group}"
        return groups
    log.info("no %s next to the images: every image is its own group in the split", " or ".join(names))
    return groups


def split_records(records: list[ImageRecord], val_fraction: float, seed: int,
                  groups: dict[str, str] | None = None) -> tuple[list, list]:
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


def _split_sha256(train: list[ImageRecord], val: list[ImageRecord]) -> str:
    digest = hashlib.sha256()
    for side, records in (("train", train), ("val", val)):
        digest.update(f"{side}:{','.join(sorted(r.image_id for r in records))};".encode())
    return digest.hexdigest()


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
        generator.manual_seed(_epoch_seed(self.seed, self.epoch))
        drawn = list(WeightedRandomSampler(self.weights, self.per_rank * self.world, replacement=True, generator=generator))
        return iter(drawn[self.rank :: self.world])

    def __len__(self) -> int:
        return self.per_rank


# --------------------------------------------------------------------------- metrics
def confusion_matrix(labels, predictions, num_classes: int) -> torch.Tensor:
    """counts[true, predicted] as int64."""
    labels, predictions = torch.as_tensor(labels).long().cpu(), torch.as_tensor(predictions).long().cpu()
    return torch.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes).view(num_classes, num_classes)


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


def evaluate(model: torch.nn.Module, loader: DataLoader) -> float:
    """Accuracy of model on loader (the earlier API; training reports the confusion-based metrics)."""
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for images, labels in loader:
            correct += int((model(images).argmax(1) == labels).sum())
            total += len(labels)
    return correct / total if total else float("nan")


# --------------------------------------------------------------------------- seeds, files
def _epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _seed_everything(seed: int) -> None:
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


def _atomic_copy(source: str | os.PathLike, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _resume_payload(cfg: TrainConfig, classes, split_sha256, sizes, model, optimizer, epoch, history) -> dict:
    """Everything to continue training; tensors, dicts, lists, numbers and strings only (weights_only-safe)."""
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
        "state_dict": _to_cpu(_unwrap(model).state_dict()),
        "optimizer": _to_cpu(optimizer.state_dict()) if optimizer is not None else None,
    }


def read_resume(path: str | os.PathLike, cfg: TrainConfig, classes: list[str], split_sha256: str) -> dict:
    """The resume file's payload, or an error that says how it differs from this run."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--resume: there is no resume file {str(path)!r} (one is written after every epoch); run without --resume to start over")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"--resume: {str(path)!r} is not a camjobs resume file ({type(error).__name__}: {error})") from None
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
        raise ValueError(f"--resume: {str(path)!r} was written with {'; '.join(problems)}; "
                         "resume with the same data and settings, or run without --resume to start over")
    return payload


# --------------------------------------------------------------------------- the training loop
class _LocalWorld:
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


class _RayWorld:
    """One Ray Train worker: DDP model, device placement, sum over workers, report per epoch."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def prepare_loader(self, loader):
        import ray.train.torch

        return ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)  # our samplers shard already

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return tensor
        reduced = tensor.to(self.device)
        torch.distributed.all_reduce(reduced)
        return reduced.cpu()

    def say(self, message: str) -> None:
        if self.rank == 0:  # Ray Train sets up the worker's root logger, and sends it to the driver
            log.info("%s", message)

    def end_epoch(self, payload: dict | None, metrics: dict) -> None:
        """Every worker reports (a collective); rank 0 attaches the resume payload as the checkpoint."""
        import ray.train

        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="camjobs-train-") as folder:
            torch.save(payload, Path(folder) / RESUME_NAME)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _train_epochs(job: dict, world) -> dict:
    """Train from job["start"] up to cfg.epochs; return the last epoch's resume payload.

    job: config (TrainConfig fields), classes, train and val records, split_sha256, deadline,
    start (a resume payload: state_dict, optimizer or None, epoch, history). The same function
    runs in this process and in every Ray Train worker.
    """
    cfg = TrainConfig(**job["config"])
    classes, train_records, val_records, start = job["classes"], job["train"], job["val"], job["start"]
    class_index = {name: i for i, name in enumerate(classes)}
    sizes = (len(train_records), len(val_records))
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg.arch, len(classes), pooling=cfg.pooling)  # the architecture; its weights come from start
    model.load_state_dict(start["state_dict"])
    model = world.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    if start["optimizer"] is not None:
        optimizer.load_state_dict(start["optimizer"])

    train_set = LabelledImages(train_records, class_index, cfg.input_size, True)
    if cfg.balanced:
        sampler = BalancedSampler([class_index[r.label] for r in train_records], cfg.seed, world.rank, world.size)
    else:
        sampler = DistributedSampler(train_set, num_replicas=world.size, rank=world.rank, shuffle=True, seed=cfg.seed)
    train_loader = world.prepare_loader(DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler))
    val_set = LabelledImages(val_records[world.rank :: world.size], class_index, cfg.input_size, False)
    val_loader = world.prepare_loader(DataLoader(val_set, batch_size=cfg.batch_size))

    history, payload = list(start["history"]), start
    for epoch in range(int(start["epoch"]), cfg.epochs):
        began = time.time()
        _seed_everything(_epoch_seed(cfg.seed, epoch, world.rank))
        sampler.set_epoch(epoch)
        model.train()
        loss_sum = torch.zeros(2, dtype=torch.float64)  # sum of losses, images
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress or world.rank != 0, leave=False)
        for images, labels in bar:
            images, labels = images.to(world.device), labels.to(world.device)
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += torch.tensor([loss.item() * len(labels), len(labels)], dtype=torch.float64)
            bar.set_postfix(loss=f"{loss.item():.3f}")
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
        world.say(f"epoch {epoch + 1}/{cfg.epochs}: loss {metrics['train_loss']:.3f}, validation accuracy "
                  f"{100 * metrics['val_accuracy']:.1f}%, balanced accuracy {100 * metrics['val_balanced_accuracy']:.1f}%")
        payload = _resume_payload(cfg, classes, job["split_sha256"], sizes, model, optimizer, epoch + 1, history) if world.rank == 0 else None
        world.end_epoch(payload, metrics)
        out_of_time = job["deadline"] is not None and time.time() > job["deadline"]
        if float(world.all_reduce(torch.tensor([float(out_of_time)]))[0]) > 0:  # every rank stops together
            world.say(f"stopping after {epoch + 1} epoch(s): the {cfg.max_seconds:.0f} s budget is spent")
            break
    return payload


def _ray_train_loop(job: dict) -> None:
    """train_loop_per_worker: the start payload travels through the object store."""
    import ray

    if isinstance(job["start"], ray.ObjectRef):
        job = {**job, "start": ray.get(job["start"])}
    try:
        _train_epochs(job, _RayWorld())
    except Exception as error:  # not every exception survives pickling to the driver (ImageInputError)
        raise RuntimeError(f"{type(error).__name__}: {error}") from error


def _resume_file_writer(path: str):
    """A Ray Train callback that copies each reported checkpoint's resume file to `path`.

    Ray runs it in the Train controller, which Ray pins to the driver's node: so the resume file
    lands next to --out on the machine that runs `camjobs train`, whichever node rank 0 is on.
    """
    from ray.train import UserCallback

    class ResumeFileWriter(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is not None:
                with checkpoint.as_directory() as folder:
                    _atomic_copy(Path(folder) / RESUME_NAME, path)

    return ResumeFileWriter()


def _train_on_ray(cfg: TrainConfig, job: dict, resume_file: str) -> dict:
    """Run _train_epochs on cfg.workers Ray Train workers; return the last reported payload."""
    import ray
    import ray.train
    from ray.train import CheckpointConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchTrainer

    from camjobs.job import init_ray

    init_ray(cfg.address)
    resources = ray.cluster_resources()
    use_gpu = resources.get("GPU", 0) > 0
    if use_gpu:
        per_worker = {"CPU": 1, "GPU": 1}
        if resources["GPU"] < cfg.workers:
            log.warning("%d workers but the cluster has %g GPUs now: Ray Train waits for more", cfg.workers, resources["GPU"])
    else:  # one core each, less where the cluster has fewer cores than workers
        per_worker = {"CPU": min(1.0, resources.get("CPU", 1.0) / cfg.workers)}
    out = Path(cfg.out).resolve()
    storage = cfg.storage_path or str(out.parent / f".{out.name}.ray-train")
    name = f"camjobs-train-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    log.info("Ray Train: %d worker(s) on %s, %s each; storage %s/%s", cfg.workers, "GPUs" if use_gpu else "CPUs", per_worker, storage, name)
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={**job, "start": ray.put(job["start"])},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=TrainRunConfig(
            name=name, storage_path=storage, checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=[_resume_file_writer(resume_file)],
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        raise RuntimeError(f"Ray Train failed: {error}") from error
    if result.checkpoint is None:
        raise RuntimeError("Ray Train finished without reporting a checkpoint")
    with result.checkpoint.as_directory() as folder:
        payload = torch.load(Path(folder) / RESUME_NAME, map_location="cpu", weights_only=True)
    if cfg.storage_path is None:  # ours: the resume file and the checkpoint hold all of it now
        shutil.rmtree(Path(storage) / name, ignore_errors=True)
        try:
            Path(storage).rmdir()
        except OSError:
            pass
    return payload


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


def train_model(cfg: TrainConfig) -> TrainResult:
    _check(cfg)
    started = time.time()
    _seed_everything(cfg.seed)
    records, classes, layout = _listing(cfg)
    groups = lesion_groups(records, layout)
    train_records, val_records = split_records(records, cfg.val_fraction, cfg.seed, groups)
    split_sha256 = _split_sha256(train_records, val_records)
    resume_file = resume_path(cfg.out)
    if cfg.resume:
        start = read_resume(resume_file, cfg, classes, split_sha256)
        log.info("resuming from %s after epoch %d", resume_file, start["epoch"])
    else:
        model = build_model(cfg.arch, len(classes), weights=cfg.weights, pooling=cfg.pooling)  # seeded above: a fresh head is reproducible
        start = {"state_dict": model.state_dict(), "optimizer": None, "epoch": 0, "history": []}
    log.info("training %s on %d images of %d lesion groups (%d validation), classes %s, %s sampling%s",
             cfg.arch, len(train_records), len({groups[r.image_id] for r in train_records}), len(val_records),
             ", ".join(classes), "class-balanced" if cfg.balanced else "uniform",
             f", {cfg.workers} Ray Train worker(s)" if cfg.workers else "")
    job = {
        "config": asdict(cfg), "classes": classes, "train": train_records, "val": val_records,
        "split_sha256": split_sha256, "start": start,
        "deadline": started + cfg.max_seconds if cfg.max_seconds is not None else None,
    }
    if int(start["epoch"]) >= cfg.epochs:
        log.info("the resume file has %d epoch(s) already: nothing to train", start["epoch"])
        final = start
    elif cfg.workers:
        final = _train_on_ray(cfg, job, resume_file)
    else:
        final = _train_epochs(job, _LocalWorld(resume_file))

    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg.arch, len(classes), pooling=cfg.pooling)
    model.load_state_dict(final["state_dict"])
    sha = save_checkpoint(cfg.out, model.eval(), arch=cfg.arch, classes=classes, input_size=cfg.input_size, pooling=cfg.pooling)
    if cfg.workers and int(final["epoch"]) > int(start["epoch"]):
        atomic_torch_save(final, resume_file)  # the callback wrote it already; this makes sure it is the last one
    history = list(final["history"])
    last = history[-1] if history else {}
    return TrainResult(
        cfg.out, classes, int(final["epoch"]), last.get("val_accuracy", float("nan")), len(train_records),
        len(val_records), sha, val_balanced_accuracy=last.get("val_balanced_accuracy", float("nan")),
        resumed_from_epoch=int(start["epoch"]) if cfg.resume else 0, resume_file=resume_file, history=history,
    )
