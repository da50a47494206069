"""The pipeline as values: each map_batches step is a Stage, and build_pipeline applies them in order.

After Ray's batch processor (ray.llm's batch StageBase and Processor): the plan builds the stages
(camjobs.pipeline.job.plan_stages), and whoever runs the job may change them as values (a benchmark timing
each stage, a test recording a stage's calls) without touching camjobs.pipeline.job or Ray. Imports Ray Data
only, never torch: a stage's callable brings its own dependencies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import ray.data
from ray.data import ActorPoolStrategy


class StageLike(Protocol):
    """Anything build_pipeline can apply: a Stage, or a step of its own (e.g. a repartition)."""

    name: str

    def apply(self, dataset: ray.data.Dataset) -> ray.data.Dataset: ...


@dataclass(frozen=True)
class Stage:
    """One map_batches step, as a value: the callable and how Ray runs it.

    A function runs as Ray tasks, called with fn_kwargs; a class runs as a pool of `actors`
    actors, each built once with the constructor arguments (a model loads once per actor).
    """

    name: str  # "decode" | "predict" | "localize"
    fn: Callable | type
    fn_kwargs: Mapping = field(default_factory=dict)
    fn_constructor_args: tuple = ()
    fn_constructor_kwargs: Mapping = field(default_factory=dict)
    batch_size: int | None = None  # None: each block is one batch
    batch_format: str = "numpy"
    num_cpus: float = 1.0  # per task, or per actor
    num_gpus: float = 0.0
    actors: int | None = None  # class stages: the pool's size (one when None)

    @property
    def is_actor_pool(self) -> bool:
        return isinstance(self.fn, type)

    def apply(self, dataset: ray.data.Dataset) -> ray.data.Dataset:
        """The stage's one map_batches call on `dataset`."""
        # No num_gpus on CPU stages: Ray Data fuses a task stage with the write only when
        # their resources are the same.
        resources = {"num_cpus": self.num_cpus, **({"num_gpus": self.num_gpus} if self.num_gpus else {})}
        if self.is_actor_pool:
            return dataset.map_batches(
                self.fn,
                fn_constructor_args=self.fn_constructor_args,
                fn_constructor_kwargs=dict(self.fn_constructor_kwargs),
                batch_size=self.batch_size,
                batch_format=self.batch_format,
                compute=ActorPoolStrategy(size=self.actors or 1),
                **resources,
            )
        return dataset.map_batches(
            self.fn,
            fn_kwargs=dict(self.fn_kwargs),
            batch_size=self.batch_size,
            batch_format=self.batch_format,
            **resources,
        )


def build_pipeline(dataset: ray.data.Dataset, stages: Sequence[StageLike]) -> ray.data.Dataset:
    """Each stage applied in order to `dataset` (lazily: nothing runs until the dataset is consumed)."""
    for stage in stages:
        dataset = stage.apply(dataset)
    return dataset
