"""`camjobs run` as a Ray Data job: list -> read+decode (CPU tasks) -> model actors -> Parquet.

The stages, top to bottom:
  layouts.list_images       the inputs, with labels and listing-time errors, as Arrow (camjobs.listing)
  listing.match_done        --incremental: what was done before with the same file fingerprint is skipped
                            here, before any Ray task; with nothing left, Ray is not started
  decode.decode_batch       read bytes, hash, decode, resize (CPU tasks, one file at a time)
  predictor.CamPredictor    predict and CAM on a batch (an actor pool, on GPUs where there are)
  localize.localize_batch   upsample, heatmap PNG, boxes (CPU tasks, off the actors' critical path)
  sink.CamParquetSink       cams/ and errors/ to staging, then output.publish_run

The three map_batches stages are values (camjobs.pipeline.stages.Stage) that plan_stages builds from the
config and the ActorPlan; run_job's `tuning` and `adapt` change them without touching this module.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from typing import TYPE_CHECKING

import pyarrow as pa

from camjobs import __version__
from camjobs.config import RunConfig
from camjobs.errors import EXIT_ERROR_BUDGET, EXIT_OK
from camjobs.interrupt import Stopped, deferred, sigterm_kept
from camjobs.layouts import DatasetListing, list_images
from camjobs.listing import match_done
from camjobs.lock import output_lock
from camjobs.output import done_rows, publish_run, runs_to_replace
from camjobs.pipeline.stats import SinkStats
from camjobs.preflight import check_run
from camjobs.schema import FINGERPRINT_INTS, NO_INT, SCHEMA_VERSION
from camjobs.segment import REFINE_METHOD, REFINE_SIDE

if TYPE_CHECKING:  # torch and Ray are imported where a run needs them, so that a run with nothing to do starts fast
    from camjobs.models.networks import LoadedModel
    from camjobs.pipeline.predictor import ModelSpec
    from camjobs.pipeline.stages import Stage, StageLike

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tuning:
    """The pipeline's knobs, as a value: a benchmark or a test runs a variant with run_job(cfg, tuning=...)."""

    cpu_batch: int = 16  # model batch of a CPU actor
    gpu_batch: int = 256  # at 224 px; scaled by input area. The actor halves it on out-of-memory.
    decode_rows: int = 8  # rows per read/decode task, and per listing block
    # With a GPU actor's large batches: fewer, larger decode tasks, so that a batch gathers fewer blocks.
    gpu_decode_rows: int = 32
    # CPUs each decode or localize + write task reserves: a whole one, so that CPU-bound tasks
    # never outnumber the cores and the model actor's threads keep theirs.
    stage_cpus: float = 1.0
    min_stage_cpus: float = 0.5  # only where less than stage_cpus is left beside the actors
    localize_rows: int = 16  # rows per localize call inside a localize + write task


@dataclass(frozen=True)
class ActorPlan:
    """How many model actors, and what each one reserves from Ray."""

    actors: int
    num_cpus: float
    num_gpus: float
    torch_threads: int | None
    batch_size: int
    decode_rows: int = Tuning.decode_rows
    stage_cpus: float = Tuning.stage_cpus  # per decode task and per localize + write task


def default_gpu_batch(input_size: int, gpu_batch: int = Tuning.gpu_batch) -> int:
    """Activation memory grows with the input's area: keep images x pixels about constant.

    Capped, so that a tiny input does not make one batch out of a whole small dataset."""
    return max(8, min(4 * gpu_batch, int(gpu_batch * (224 / input_size) ** 2)))


def plan_actors(cfg: RunConfig, cluster: dict, input_size: int = 224, tuning: Tuning = Tuning()) -> ActorPlan:
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
        batch_size = cfg.batch_size or default_gpu_batch(input_size, tuning.gpu_batch)
        decode_rows = min(tuning.gpu_decode_rows, max(tuning.decode_rows, batch_size // 8))
        free_cpus = total_cpus - actors * 1.0
        if free_cpus < tuning.min_stage_cpus:
            raise ValueError(
                f"the cluster has {total_cpus:g} CPUs and {actors} GPU actor(s) take one each: "
                "none left for the decode and localize tasks (use fewer --actors, or nodes with more CPUs)"
            )
        return ActorPlan(actors, 1.0, gpus_per_actor, None, batch_size, decode_rows, _stage_cpus(free_cpus, tuning))
    actors = cfg.actors or 1
    cpus_per_actor = max(0.25, min(total_cpus / 2, total_cpus - 1) / actors)
    # Summed over the cluster; each actor caps it at its own machine's cores.
    threads = max(1, int(total_cpus // actors))
    return ActorPlan(
        actors,
        cpus_per_actor,
        0.0,
        threads,
        cfg.batch_size or tuning.cpu_batch,
        tuning.decode_rows,
        _stage_cpus(total_cpus - actors * cpus_per_actor, tuning),
    )


def _stage_cpus(free_cpus: float, tuning: Tuning) -> float:
    """CPUs per decode task and per localize + write task, given the CPUs the actors leave."""
    return tuning.stage_cpus if free_cpus >= tuning.stage_cpus else tuning.min_stage_cpus


def plan_stages(
    cfg: RunConfig,
    plan: ActorPlan,
    spec: ModelSpec,
    run_id: str,
    settings: dict,
    tuning: Tuning = Tuning(),
) -> tuple[Stage, ...]:
    """The job's three stages (decode, predict, localize), sized by the plan.

    `settings` are the run's (model input size, refinement)."""
    from camjobs.pipeline.decode import decode_batch
    from camjobs.pipeline.localize import localize_batch
    from camjobs.pipeline.predictor import CamPredictor
    from camjobs.pipeline.stages import Stage

    decode = Stage(
        "decode",
        decode_batch,
        fn_kwargs={
            "input_size": settings["input_size"],
            "max_pixels": cfg.max_pixels,
            "decode_on": cfg.decode_on,
            "refine_side": REFINE_SIDE if cfg.refine else None,
        },
        batch_size=plan.decode_rows,
        num_cpus=plan.stage_cpus,
    )
    predict = Stage(
        "predict",
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
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus,
        actors=plan.actors,
    )
    # One localize + write task per model batch: a repartition between costs more than it gives
    # (one more operator takes a share of Ray Data's per-operator reservation).
    # Inside the task, localize_rows rows at a time, so that the write takes blocks near Ray Data's
    # target size, not one of a gigabyte (256 full-size heatmaps of 6000 px photographs).
    # Same resources as the write, so that Ray Data fuses the two into one task per block.
    localize = Stage(
        "localize",
        localize_batch,
        fn_kwargs={"heatmap_max_side": cfg.heatmap_max_side, "refine_method": settings["refine"]},
        batch_size=tuning.localize_rows,
        batch_format="pyarrow",
        num_cpus=plan.stage_cpus,
    )
    return decode, predict, localize


def listing_blocks(table: pa.Table, rows_per_block: int, max_blocks: int = 5000) -> list[pa.Table]:
    """The pending listing rows (schema.LISTING_SCHEMA) as blocks for the pipeline, slices of one table:
    typed, so an all-null column stays a string column; the fingerprint's integers with NO_INT for none."""
    for name in FINGERPRINT_INTS:
        table = table.set_column(table.schema.get_field_index(name), name, table[name].fill_null(NO_INT))
    rows_per_block = max(rows_per_block, -(-table.num_rows // max_blocks))
    return [table.slice(start, rows_per_block) for start in range(0, table.num_rows, rows_per_block)]


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def init_ray(address: str | None, *, quiet: bool = False) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS); else start a new local one.

    "local" is explicit: a bare ray.init() would join whatever `ray start` cluster happens
    to run on this machine, and a laptop smoke test must not land on someone else's.
    quiet: Ray's own log lines go to its session's log files only (quiet_ray).
    """
    import ray

    if quiet:
        quiet_ray()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    # A cluster of our own needs no dashboard: it costs ~1 GiB of memory and a few % of CPU.
    dashboard = {"include_dashboard": False} if address == "local" else {}
    with sigterm_kept():  # camjobs run's SIGTERM handler cleans up; Ray's own would exit past that
        if not quiet:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True, **dashboard)
            return
        with _stderr_held_back():
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, **dashboard)


def quiet_ray() -> None:
    """Every knob of Ray's console output, set for a quiet run: one progress bar, no log lines.

    Python's and Ray Data's log lines still go to Ray's session logs (logs/ in its session folder);
    `--verbose` leaves all of this alone. Workers' prints stay in their own files (init_ray's
    log_to_driver=False): their errors reach the driver as exceptions anyway."""
    import ray.data

    # Ray's C++ core writes its errors to the driver's stderr besides its log file, whatever the Python
    # side says (core_worker's warning that Ray Data's actors have constructor arguments in the object
    # store, on every run); its level is the only knob, read by each Ray process as it starts.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    # Ray Data: the dataset's own progress bar on a terminal, none per operator; its log lines
    # (plans, "will hang unless more CPUs are freed", the progress blocks it logs when stdout is
    # not a terminal) to its file handler only.
    ray.data.DataContext.get_current().enable_operator_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.CRITICAL)


@contextmanager
def _stderr_held_back() -> Iterator[None]:
    """The process's stderr (file descriptor 2) into a temporary file while Ray starts, written out only if
    the start fails: Ray's C++ core writes there past Python's logging (at start-up, that its level was
    set from RAY_BACKEND_LOG_LEVEL)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


@dataclass
class RunResult:
    run_id: str
    summary: dict
    summary_path: str
    exit_code: int
    message: str


# Given the planned stages, the stages to run (see run_job).
Adapt = Callable[[tuple["Stage", ...]], Sequence["StageLike"]]


def run_job(cfg: RunConfig, *, tuning: Tuning = Tuning(), adapt: Adapt | None = None) -> RunResult:
    """Run the whole job under the output's lock; publish it; say how it went.

    `tuning` sizes the pipeline; `adapt`, given the planned stages, returns the stages to run
    (a benchmark timing each stage, a test recording one), so that nothing changes this module.
    A run that fails or is interrupted (camjobs.interrupt) stops its Ray work first, then drops its
    staging and releases the lock (output_lock)."""
    check_run(cfg)  # a configuration mistake exits 2 before the lock creates the output folder
    run_id = new_run_id()
    try:
        with output_lock(cfg.output, run_id, cfg.lock_lease) as lease, _ray_stopped_on_failure():
            prepared = _prepare(cfg, run_id, tuning)
            stats = _build_and_write(cfg, prepared, tuning, adapt)
            lease.check()
            with deferred(run_id):  # a signal now waits until the run is published
                return _summarize(cfg, prepared, stats, time.time())
    except Stopped as stop:
        stop.run_id = run_id
        raise


@contextmanager
def _ray_stopped_on_failure() -> Iterator[None]:
    """A run that fails or is interrupted shuts down the Ray it started: a local cluster with its
    raylet, agents and workers, or its connection to a cluster it joined (Ray then ends the job's
    tasks and actors), before its staging is removed. A run that completes leaves Ray to its caller
    (another run_job may follow; at exit Ray shuts itself down)."""
    ray = sys.modules.get("ray")  # a run that never needed Ray has not imported it
    started_here = ray is None or not ray.is_initialized()
    try:
        yield
    except BaseException:
        ray = sys.modules.get("ray")
        if started_here and ray is not None:
            ray.shutdown()
        raise


@dataclass(frozen=True)
class Prepared:
    """What a run knows before its pipeline starts, and when each step of getting there ended."""

    run_id: str
    listing: DatasetListing
    spec: ModelSpec
    model: LoadedModel
    settings: dict
    pending: pa.Table  # the listing's rows that go to the pipeline (schema.LISTING_SCHEMA)
    skipped_unopened: int  # done before, same fingerprint: skipped without a Ray task (listing.match_done)
    supersedes: tuple[str, ...]  # the runs whose rows an --overwrite run replaces
    plan: ActorPlan | None  # None: nothing to process, Ray not started
    started: float
    listed: float
    ray_ready: float


def _prepare(cfg: RunConfig, run_id: str, tuning: Tuning) -> Prepared:
    """The listing, the model (checked here), its settings, what the write mode says of the rows written
    before (refused without a mode: before any Ray work), the keys done before, Ray, and the plan."""
    started = time.time()
    listing = list_images(cfg.data, cfg.layout, follow_symlinks=cfg.follow_symlinks, label_column=cfg.label_column)
    classes = tuple(cfg.classes) if cfg.classes else None
    from camjobs.pipeline.predictor import ModelSpec

    spec = ModelSpec(cfg.checkpoint, cfg.model, classes, cfg.weights, cfg.input_size)
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
    supersedes = runs_to_replace(cfg.output, settings, cfg.write_mode)
    pending, unopened = listing.table, 0
    if cfg.incremental:
        pending, unopened = match_done(listing.table, done_rows(cfg.output, settings), rehash=cfg.rehash)
        # From here on only its count and layout: the columns of every listed image go before Ray starts.
        listing = dataclasses.replace(listing, table=listing.table.select([]))
    listed = time.time()
    log.info(
        "%d inputs (%s layout), model %s (%s)%s",
        len(listing),
        listing.layout,
        model.arch,
        model.model_sha256[:12],
        f", {unopened} unchanged since done (skipped unopened)" if cfg.incremental else "",
    )
    if pending.num_rows == 0:  # nothing needs the model: no Ray, no pipeline
        return Prepared(
            run_id, listing, spec, model, settings, pending, unopened, supersedes, None, started, listed, listed
        )

    import ray

    init_ray(cfg.address, quiet=not log.isEnabledFor(logging.DEBUG))  # Ray's own lines with --verbose
    plan = plan_actors(cfg, ray.cluster_resources(), model.input_size, tuning)
    log.info(
        "%d model actor(s), %g CPU / %g GPU each, batch %d, %d images per decode task, %g CPU per stage task",
        plan.actors,
        plan.num_cpus,
        plan.num_gpus,
        plan.batch_size,
        plan.decode_rows,
        plan.stage_cpus,
    )
    if cfg.decode_on == "gpu" and not plan.num_gpus:
        log.warning("--decode-on gpu without GPU actors: the model actors decode the images on their CPU")
    ready = time.time()
    return Prepared(run_id, listing, spec, model, settings, pending, unopened, supersedes, plan, started, listed, ready)


def _build_and_write(cfg: RunConfig, prepared: Prepared, tuning: Tuning, adapt: Adapt | None) -> SinkStats:
    """The planned stages (as `adapt` changes them) over the listing, written through the sink."""
    if prepared.plan is None:  # nothing pending (_prepare): no sink, no Ray Data
        return SinkStats()
    import ray.data

    from camjobs.pipeline.sink import CamParquetSink
    from camjobs.pipeline.stages import build_pipeline

    plan = prepared.plan
    sink = CamParquetSink(cfg.output, prepared.run_id)
    stages = plan_stages(cfg, plan, prepared.spec, prepared.run_id, prepared.settings, tuning)
    dataset = ray.data.from_arrow(listing_blocks(prepared.pending, plan.decode_rows))
    dataset = build_pipeline(dataset, adapt(stages) if adapt else stages)
    dataset.write_datasink(sink, ray_remote_args={"num_cpus": plan.stage_cpus})
    return sink.stats or SinkStats()


def _summarize(cfg: RunConfig, prepared: Prepared, stats: SinkStats, finished: float) -> RunResult:
    """Check that every input is accounted for once, publish the run's summary, and say how it went."""
    run_id, inputs = prepared.run_id, len(prepared.listing)
    processed, errors, skipped = stats.processed, stats.errors, stats.skipped + prepared.skipped_unopened
    # Every input ends up exactly once in cams, errors or skipped; anything else is a bug.
    if processed + errors + skipped != inputs:
        raise RuntimeError(
            f"lost rows: {inputs} inputs but {processed} processed + {errors} errors + {skipped} skipped; "
            f"run {run_id} not published"
        )
    summary = _summary(cfg, prepared, stats, finished)
    summary_path = publish_run(cfg.output, run_id, summary)
    message = f"{processed} processed, {errors} errors" + (f", {skipped} skipped" if cfg.incremental else "")
    exit_code = EXIT_OK
    if stats.refine_failed:
        message += f", refinement failed on {stats.refine_failed} (their CAM rows are kept; mask_rle is null)"
    attempted = inputs - skipped
    if attempted and errors / attempted > cfg.max_error_fraction:
        exit_code = EXIT_ERROR_BUDGET
        message += (
            f": error fraction {errors / attempted:.1%} is over --max-error-fraction {cfg.max_error_fraction:.1%}"
        )
    return RunResult(run_id, summary, summary_path, exit_code, message)


def _summary(cfg: RunConfig, prepared: Prepared, stats: SinkStats, finished: float) -> dict:
    """The run's summary (runs/<run_id>.json): config, model, settings, counts, plan, timings."""
    model, inputs = prepared.model, len(prepared.listing)
    started, listed, ray_ready = prepared.started, prepared.listed, prepared.ray_ready
    return {
        "run_id": prepared.run_id,
        "schema_version": SCHEMA_VERSION,
        "status": "completed",
        "config": cfg.resolved().redacted(),  # absolute local paths, no credentials
        "layout": prepared.listing.layout,
        "model": {
            "arch": model.arch,
            "classes": list(model.classes),
            "input_size": model.input_size,
            "mean": list(model.mean),
            "std": list(model.std),
            "model_sha256": model.model_sha256,
        },
        "settings": prepared.settings,
        "write_mode": str(cfg.write_mode),
        "supersedes": list(prepared.supersedes),
        "versions": library_versions(),
        "counts": {
            "inputs": inputs,
            "processed": stats.processed,
            "skipped": stats.skipped + prepared.skipped_unopened,
            "skipped_fingerprint": prepared.skipped_unopened,  # same size and mtime: never opened
            "skipped_hash": stats.skipped,  # read and hashed: same content
            "errors": stats.errors,
            **({"refine_failed": stats.refine_failed} if cfg.refine else {}),
        },
        "error_types": dict(stats.error_types),
        "rows_per_node": dict(stats.rows_per_node),
        "actors": dataclasses.asdict(prepared.plan) if prepared.plan else None,
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


def library_versions() -> dict[str, str]:
    import cv2
    import numpy
    import pyarrow
    import torch
    import torchvision

    return {
        "camjobs": __version__,
        "python": platform.python_version(),
        "ray": version("ray"),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pyarrow": pyarrow.__version__,
        "numpy": numpy.__version__,
        "opencv": cv2.__version__,
    }
