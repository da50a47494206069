"""Variants of camjobs' pipeline for benchmarks, as values passed to run_job (a Tuning, an adapt
function over the planned stages), never by changing camjobs.pipeline.job or Ray: one home for what the
variant names mean and how a run is timed."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.harness import timed

NAMES = (
    "default; changes joined by '+': splitN (blocks of N rows before the localize stage), gpubatchN, "
    "decoderowsN (decodeN), halfcpu (stage tasks reserve 0.5 CPU), gpudecode (--decode-on gpu), "
    "reserveP (Ray Data reserves P per cent per operator), noreserve, nodownstream (no downstream backpressure)"
)


@dataclass(frozen=True)
class Repartition:
    """A stage-like step for build_pipeline: blocks cut to `rows` rows (the splitN variant puts one
    between the model actor and the localize stage)."""

    rows: int
    name: str = "repartition"

    def apply(self, dataset):
        return dataset.repartition(target_num_rows_per_block=self.rows)


@dataclass(frozen=True)
class Variant:
    """A change to camjobs' pipeline for one run, as values: Tuning fields, RunConfig fields, Ray
    Data DataContext fields, and a repartition to `split_rows` rows before the localize stage."""

    name: str = "default"
    tuning: Mapping = field(default_factory=dict)
    config: Mapping = field(default_factory=dict)
    context: Mapping = field(default_factory=dict)
    split_rows: int | None = None


def parse_variant(name: str) -> Variant:
    """A variant from its name (NAMES), e.g. "split16+decoderows8"."""
    tuning, config, context, split = {}, {}, {}, None
    for change in name.split("+"):
        number = "".join(c for c in change if c.isdigit())
        if change == "default":
            pass
        elif change.startswith("split") and number:
            split = int(number)
        elif change.startswith("gpubatch") and number:
            tuning["gpu_batch"] = int(number)
        elif change.startswith(("decoderows", "decode")) and number:
            tuning["gpu_decode_rows"] = int(number)
        elif change == "halfcpu":  # decode and localize tasks reserve half a CPU
            tuning["stage_cpus"] = 0.5
        elif change == "gpudecode":
            config["decode_on"] = "gpu"
        elif change.startswith("reserve") and number:
            context["op_resource_reservation_ratio"] = int(number) / 100
        elif change == "noreserve":
            context["op_resource_reservation_enabled"] = False
        elif change == "nodownstream":
            context["downstream_capacity_backpressure_ratio"] = None
        else:
            raise ValueError(f"unknown variant {change!r} (in {name!r}); see variants.parse_variant")
    return Variant(name, tuning, config, context, split)


def adapt_stages(
    stages, variant: Variant | None = None, log_path: str | None = None, change: Mapping[str, Callable] | None = None
) -> list:
    """The planned stages as one run wants them: each fn changed by change[stage.name](fn) (a
    simulation), timed into log_path, and the variant's repartition before the localize stage."""
    out = []
    for stage in stages:
        fn = (change or {}).get(stage.name, lambda f: f)(stage.fn)
        if log_path:
            fn = timed(stage.name, fn, log_path)
        if variant and variant.split_rows and stage.name == "localize":
            out.append(Repartition(variant.split_rows))
        out.append(stage if fn is stage.fn else dataclasses.replace(stage, fn=fn))
    return out


def run_variant(
    cfg, variant: Variant | None = None, log_path: str | None = None, change: Mapping[str, Callable] | None = None
):
    """camjobs.pipeline.job.run_job with the variant's Tuning, RunConfig and DataContext changes, its stages
    adapted (adapt_stages); Ray Data's per-operator budgets logged at DEBUG into its ray-data.log."""
    import logging

    import ray.data

    from camjobs.pipeline.job import Tuning, run_job

    variant = variant or Variant()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    for key, value in variant.context.items():
        if not hasattr(context, key):
            raise ValueError(f"Ray Data's DataContext has no {key}")
        setattr(context, key, value)
    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.DEBUG)
    cfg = dataclasses.replace(cfg, **variant.config)
    return run_job(
        cfg, tuning=Tuning(**variant.tuning), adapt=lambda stages: adapt_stages(stages, variant, log_path, change)
    )


def init_local_ray(cpus: float | None = None, gpus: float | None = None) -> None:
    """A local Ray cluster of its own (logical CPUs and GPUs as claimed: a simulated node), quiet."""
    import logging

    import ray

    ray.init(
        address="local",
        num_cpus=cpus,
        num_gpus=gpus,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )


def copy_ray_data_log(target) -> None:
    """This session's Ray Data log (operator budgets and queues), for the analysis of a run."""
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    with open(target, "wb") as copy:
        for part in sorted((session / "logs" / "ray-data").glob("*.log")):
            copy.write(part.read_bytes())
