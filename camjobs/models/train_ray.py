"""The training loop on N data-parallel Ray Train workers (DistributedDataParallel; one GPU each where
the cluster has GPUs).

Each worker runs ``camjobs.models.train_loop.train_epochs`` with a ``RayWorld``: rank 0 reports the resume
payload (the last epoch and the best so far, chosen by train_epochs as in a local run) as the epoch's Ray
Train checkpoint, and a callback in the Train controller copies it to the resume file next to ``--out``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, ScalingConfig, UserCallback
from ray.train import RunConfig as TrainRunConfig
from ray.train.torch import TorchTrainer

from camjobs.models.train_loop import TrainConfig, train_epochs
from camjobs.pipeline.job import init_ray

log = logging.getLogger(__name__)

RESUME_NAME = "resume.pt"  # the file inside a Ray Train checkpoint folder


class RayWorld:
    """One Ray Train worker: DDP model, device placement, sum over workers, report per epoch."""

    def __init__(self):
        context = ray.train.get_context()
        self.rank, self.size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model):
        return ray.train.torch.prepare_model(model)

    def prepare_loader(self, loader):
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
        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="camjobs-train-") as folder:
            torch.save(payload, Path(folder) / RESUME_NAME)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _ray_train_loop(job: dict) -> None:
    """train_loop_per_worker: the start payload travels through the object store."""
    if isinstance(job["start"], ray.ObjectRef):
        job = {**job, "start": ray.get(job["start"])}
    try:
        train_epochs(job, RayWorld())
    except Exception as error:  # not every exception survives pickling to the driver (ImageInputError)
        raise RuntimeError(f"{type(error).__name__}: {error}") from error


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


class ResumeFileWriter(UserCallback):
    """A Ray Train callback that copies each reported checkpoint's resume file to `path`.

    Ray runs it in the Train controller, which Ray pins to the driver's node: so the resume file
    lands next to --out on the machine that runs `camjobs train`, whichever node rank 0 is on.
    """

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                _atomic_copy(Path(folder) / RESUME_NAME, self.path)


def _resources_per_worker(cfg: TrainConfig) -> tuple[bool, dict]:
    """(use_gpu, resources of one worker): a GPU each where the cluster has GPUs, else a share of the cores."""
    resources = ray.cluster_resources()
    if resources.get("GPU", 0) > 0:
        if resources["GPU"] < cfg.workers:
            log.warning(
                "%d workers but the cluster has %g GPUs now: Ray Train waits for more", cfg.workers, resources["GPU"]
            )
        return True, {"CPU": 1, "GPU": 1}
    return False, {"CPU": min(1.0, resources.get("CPU", 1.0) / cfg.workers)}  # one core each, less if fewer cores


def train_on_ray(cfg: TrainConfig, job: dict, resume_file: str) -> dict:
    """Run train_epochs on cfg.workers Ray Train workers; return the last reported payload."""
    init_ray(cfg.address)
    use_gpu, per_worker = _resources_per_worker(cfg)
    out = Path(cfg.out).resolve()
    storage = cfg.storage_path or str(out.parent / f".{out.name}.ray-train")
    name = f"camjobs-train-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    log.info(
        "Ray Train: %d worker(s) on %s, %s each; storage %s/%s",
        cfg.workers,
        "GPUs" if use_gpu else "CPUs",
        per_worker,
        storage,
        name,
    )
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={**job, "start": ray.put(job["start"])},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=TrainRunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=[ResumeFileWriter(resume_file)],
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
        with contextlib.suppress(OSError):
            Path(storage).rmdir()
    return payload
