"""`camjobs run` as a Ray Data job: list -> read+decode (CPU tasks) -> model actors -> Parquet.

The stages, top to bottom:
  layouts.list_images       the inputs, with labels and listing-time errors
  decode.decode_batch       read bytes, hash, decode, resize (CPU tasks, one file at a time)
  predictor.CamPredictor    predict and CAM on a batch (an actor pool, on GPUs where there are)
  localize.localize_batch   upsample, heatmap PNG, boxes (CPU tasks, off the actors' critical path)
  sink.CamParquetSink       cams/ and errors/ to staging, then sink.publish_run
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy

from camjobs import __version__
from camjobs.config import RunConfig
from camjobs.decode import decode_batch
from camjobs.errors import EXIT_ERROR_BUDGET, EXIT_OK
from camjobs.layouts import list_images
from camjobs.localize import localize_batch
from camjobs.output import existing_keys, output_lock, publish_run
from camjobs.predictor import CamPredictor, ModelSpec
from camjobs.schema import LISTING_SCHEMA, SCHEMA_VERSION
from camjobs.segment import REFINE_METHOD, REFINE_SIDE
from camjobs.sink import CamParquetSink, SinkStats

log = logging.getLogger(__name__)

DEFAULT_CPU_BATCH = 16
DEFAULT_GPU_BATCH = 256  # at 224 px; scaled by input area. The actor halves it on out-of-memory.
DECODE_BATCH = 8  # rows per read/decode task, and per listing block
# With a GPU actor's large batches: fewer, larger decode tasks (a 256-image batch gathered from 8
# blocks rather than 32). On a simulated GPU node (benchmarks/pipeline.py): 1.15-1.6 x faster.
GPU_DECODE_ROWS = 32
# CPUs each decode task and each localize + Parquet write task reserves: a whole one, so that
# CPU-bound tasks never outnumber the cores and the model actor's threads keep theirs. Half
# tasks, twice as many, were 1.24-1.6 x slower on a simulated GPU node (benchmarks/pipeline.py)
# and 1.06-1.10 x slower beside a CPU actor on 2 cores (benchmarks/bench.py). Half a CPU only
# where less than one is left beside the actors.
STAGE_CPUS = 1.0
MIN_STAGE_CPUS = 0.5
LOCALIZE_ROWS = 16  # rows per localize call inside a localize + write task


@dataclass(frozen=True)
class ActorPlan:
    """How many model actors, and what each one reserves from Ray."""

    actors: int
    num_cpus: float
    num_gpus: float
    torch_threads: int | None
    batch_size: int
    decode_rows: int = DECODE_BATCH
    stage_cpus: float = STAGE_CPUS  # per decode task and per localize + write task


def default_gpu_batch(input_size: int) -> int:
    """Activation memory grows with the input's area: keep images x pixels about constant.

    Capped, so that a tiny input does not make one batch out of a whole small dataset."""
    return max(8, min(4 * DEFAULT_GPU_BATCH, int(DEFAULT_GPU_BATCH * (224 / input_size) ** 2)))


def plan_actors(cfg: RunConfig, cluster: dict, input_size: int = 224) -> ActorPlan:
    """Size the actor pool from the cluster's resources.

    CPU actors must leave CPUs to the read/decode and write tasks, or the pipeline
    starves and hangs; each reserves at most half of the CPUs, and sets its torch
    threads itself (Ray would pin it to its reservation, often one thread).
    """
    total_cpus = float(cluster.get("CPU", os.cpu_count() or 1))
    total_gpus = float(cluster.get("GPU", 0))
    gpus_per_actor = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if total_gpus > 0 else 0.0)
    if gpus_per_actor > 0:
        if total_gpus < gpus_per_actor:
            raise ValueError(f"--gpus-per-actor {gpus_per_actor} but the cluster has {total_gpus:g} GPUs")
        actors = cfg.actors or max(1, int(total_gpus // gpus_per_actor))
        batch_size = cfg.batch_size or default_gpu_batch(input_size)
        decode_rows = min(GPU_DECODE_ROWS, max(DECODE_BATCH, batch_size // 8))
        free_cpus = total_cpus - actors * 1.0
        if free_cpus < MIN_STAGE_CPUS:
            raise ValueError(
                f"the cluster has {total_cpus:g} CPUs and {actors} GPU actor(s) take one each: "
                "none left for the decode and localize tasks (use fewer --actors, or nodes with more CPUs)"
            )
        return ActorPlan(actors, 1.0, gpus_per_actor, None, batch_size, decode_rows, _stage_cpus(free_cpus))
    actors = cfg.actors or 1
    cpus_per_actor = max(0.25, min(total_cpus / 2, total_cpus - 1) / actors)
    # Summed over the cluster; each actor caps it at its own machine's cores.
    threads = max(1, int(total_cpus // actors))
    return ActorPlan(actors, cpus_per_actor, 0.0, threads, cfg.batch_size or DEFAULT_CPU_BATCH,
                     stage_cpus=_stage_cpus(total_cpus - actors * cpus_per_actor))


def _stage_cpus(free_cpus: float) -> float:
    """CPUs per decode task and per localize + write task, given the CPUs the actors leave."""
    return STAGE_CPUS if free_cpus >= STAGE_CPUS else MIN_STAGE_CPUS


def listing_blocks(records: list, rows_per_block: int = DECODE_BATCH, max_blocks: int = 5000) -> list[pa.Table]:
    """The listing as typed Arrow blocks: typed, so an all-null column stays a string column."""
    table = pa.Table.from_pylist(
        [{name: getattr(record, name) for name in LISTING_SCHEMA.names} for record in records], schema=LISTING_SCHEMA
    )
    rows_per_block = max(rows_per_block, -(-table.num_rows // max_blocks))
    return [table.slice(start, rows_per_block) for start in range(0, table.num_rows, rows_per_block)]


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def init_ray(address: str | None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS); else start a new local one.

    "local" is explicit: a bare ray.init() would join whatever `ray start` cluster happens
    to run on this machine, and a laptop smoke test must not land on someone else's.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    # A cluster of our own needs no dashboard: it costs ~1 GiB of memory and a few % of CPU.
    dashboard = {"include_dashboard": False} if address == "local" else {}
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True, **dashboard)


@dataclass
class RunResult:
    run_id: str
    summary: dict
    summary_path: str
    exit_code: int
    message: str


def run_job(cfg: RunConfig) -> RunResult:
    """Run the whole job under the output's lock; publish it; say how it went."""
    run_id = new_run_id()
    with output_lock(cfg.output, run_id):
        return _run_locked(cfg, run_id)


def _run_locked(cfg: RunConfig, run_id: str) -> RunResult:
    started = time.time()
    listing = list_images(cfg.data, cfg.layout, follow_symlinks=cfg.follow_symlinks)
    spec = ModelSpec(cfg.checkpoint, cfg.model, tuple(cfg.classes) if cfg.classes else None, cfg.weights, cfg.input_size)
    # Load once here too: a bad checkpoint fails now, with its message, not inside actors.
    model = spec.load()
    settings = {
        "model_sha256": model.model_sha256,
        "method": cfg.method,
        "threshold": cfg.threshold,
        "target_mode": cfg.target,
        "input_size": model.input_size,
        "refine": REFINE_METHOD if cfg.refine else None,
    }
    skip_keys = existing_keys(cfg.output, settings) if cfg.incremental else frozenset()
    listed = time.time()
    log.info(
        "%d inputs (%s layout), model %s (%s)%s", len(listing.records), listing.layout, model.arch,
        model.model_sha256[:12], f", {len(skip_keys)} done before" if cfg.incremental else "",
    )

    init_ray(cfg.address)
    plan = plan_actors(cfg, ray.cluster_resources(), model.input_size)
    log.info(
        "%d model actor(s), %g CPU / %g GPU each, batch %d, %d images per decode task, %g CPU per stage task",
        plan.actors, plan.num_cpus, plan.num_gpus, plan.batch_size, plan.decode_rows, plan.stage_cpus,
    )
    if cfg.decode_on == "gpu" and not plan.num_gpus:
        log.warning("--decode-on gpu without GPU actors: the model actors decode the images on their CPU")
    ray_ready = time.time()

    inputs = len(listing.records)
    sink = CamParquetSink(cfg.output, run_id)
    if inputs:
        dataset = ray.data.from_arrow(listing_blocks(listing.records, plan.decode_rows))
        dataset = dataset.map_batches(
            decode_batch,
            fn_kwargs={"input_size": model.input_size, "max_pixels": cfg.max_pixels, "skip_keys": skip_keys,
                       "decode_on": cfg.decode_on, "refine_side": REFINE_SIDE if cfg.refine else None},
            batch_size=plan.decode_rows,
            batch_format="numpy",
            num_cpus=plan.stage_cpus,
        )
        dataset = dataset.map_batches(
            CamPredictor,
            fn_constructor_args=(spec,),
            fn_constructor_kwargs={
                "method": cfg.method,
                "threshold": cfg.threshold,
                "target": cfg.target,
                "run_id": run_id,
                "torch_threads": plan.torch_threads,
                "precision": cfg.precision,
            },
            batch_size=plan.batch_size,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=plan.actors),
            num_cpus=plan.num_cpus,
            num_gpus=plan.num_gpus,
        )
        # One localize + write task per model batch (256 rows on a GPU, ~1 s of work). Splitting
        # the actor's blocks with repartition() cost more than it gave: each repartition task
        # reserves a CPU for a few ms of work, and one more operator takes a share of Ray Data's
        # per-operator CPU reservation, so that fewer decode tasks ran (on a simulated 16-CPU GPU
        # node 1.4 x slower, benchmarks/schedule.py). Inside the task, LOCALIZE_ROWS rows at a time:
        # Ray Data cuts the output into blocks near its target block size (128 MiB) and the write
        # takes them one by one, where 256 full-size heatmaps of 6000 px photographs would make
        # one block of a gigabyte.
        # Same resources as the write, so that Ray Data fuses the two into one task per block.
        dataset = dataset.map_batches(
            localize_batch,
            fn_kwargs={"heatmap_max_side": cfg.heatmap_max_side, "refine_method": settings["refine"]},
            batch_size=LOCALIZE_ROWS,
            batch_format="pyarrow",
            num_cpus=plan.stage_cpus,
        )
        dataset.write_datasink(sink, ray_remote_args={"num_cpus": plan.stage_cpus})
    finished = time.time()

    stats = sink.stats or SinkStats()
    processed, errors, skipped = stats.processed, stats.errors, stats.skipped
    summary = {
        "run_id": run_id,
        "schema_version": SCHEMA_VERSION,
        "status": "completed",
        "config": cfg.redacted(),
        "layout": listing.layout,
        "model": {
            "arch": model.arch,
            "classes": list(model.classes),
            "input_size": model.input_size,
            "mean": list(model.mean),
            "std": list(model.std),
            "model_sha256": model.model_sha256,
        },
        "settings": settings,
        "versions": library_versions(),
        "counts": {"inputs": inputs, "processed": processed, "skipped": skipped, "errors": errors,
                   **({"refine_failed": stats.refine_failed} if cfg.refine else {})},
        "error_types": dict(stats.error_types),
        "rows_per_node": dict(stats.rows_per_node),
        "actors": dataclasses.asdict(plan),
        "timings": {
            "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
            "list_and_load_s": round(listed - started, 3),
            "ray_init_s": round(ray_ready - listed, 3),
            "pipeline_s": round(finished - ray_ready, 3),
            "total_s": round(finished - started, 3),
        },
        "throughput": {
            "images_per_s": round(inputs / (finished - started), 3) if inputs else 0.0,
            "pipeline_images_per_s": round(inputs / (finished - ray_ready), 3) if inputs else 0.0,
        },
    }
    # Every input ends up exactly once in cams, errors or skipped; anything else is a bug.
    if processed + errors + skipped != inputs:
        raise RuntimeError(
            f"lost rows: {inputs} inputs but {processed} processed + {errors} errors + {skipped} skipped; "
            f"run {run_id} not published"
        )
    summary_path = publish_run(cfg.output, run_id, summary)
    exit_code, message = EXIT_OK, f"{processed} processed, {errors} errors" + (f", {skipped} skipped" if cfg.incremental else "")
    if stats.refine_failed:
        message += f", refinement failed on {stats.refine_failed} (their CAM rows are kept; mask_rle is null)"
    attempted = inputs - skipped
    if attempted and errors / attempted > cfg.max_error_fraction:
        exit_code = EXIT_ERROR_BUDGET
        message += f": error fraction {errors / attempted:.1%} is over --max-error-fraction {cfg.max_error_fraction:.1%}"
    return RunResult(run_id, summary, summary_path, exit_code, message)


def library_versions() -> dict[str, str]:
    import cv2
    import numpy
    import pyarrow
    import torch
    import torchvision

    return {
        "camjobs": __version__,
        "python": platform.python_version(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pyarrow": pyarrow.__version__,
        "numpy": numpy.__version__,
        "opencv": cv2.__version__,
    }
