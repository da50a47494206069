"""The pipeline as values: the stages the plan builds, build_pipeline's order, and Tuning reaching the plan."""

from __future__ import annotations

import numpy as np
import pytest

from camjobs.config import RunConfig
from camjobs.pipeline.decode import decode_batch
from camjobs.pipeline.job import ActorPlan, Tuning, plan_actors, plan_stages
from camjobs.pipeline.localize import localize_batch
from camjobs.pipeline.predictor import CamPredictor, ModelSpec
from camjobs.pipeline.stages import Stage, build_pipeline
from camjobs.segment import REFINE_METHOD, REFINE_SIDE

CFG = RunConfig(
    data="d",
    output="o",
    model="resnet18",
    classes=["a", "b"],
    method="gradcam",
    threshold=0.3,
    target="label",
    heatmap_max_side=300,
    max_pixels=1000,
    decode_on="gpu",
    precision="fp32",
    refine=True,
)


def test_plan_stages_sizes_each_stage_from_the_plan():
    plan = ActorPlan(
        actors=3, num_cpus=0.75, num_gpus=0.5, torch_threads=5, batch_size=48, decode_rows=12, stage_cpus=0.5
    )
    spec = ModelSpec(arch="resnet18", classes=("a", "b"))
    settings = {"input_size": 96, "refine": REFINE_METHOD}
    decode, predict, localize = plan_stages(CFG, plan, spec, "run-1", settings, Tuning(localize_rows=7))

    assert (decode.name, decode.fn, decode.batch_size, decode.batch_format) == ("decode", decode_batch, 12, "numpy")
    assert (decode.num_cpus, decode.num_gpus) == (0.5, 0.0) and not decode.is_actor_pool
    assert dict(decode.fn_kwargs) == {
        "input_size": 96,
        "max_pixels": 1000,
        "decode_on": "gpu",
        "refine_side": REFINE_SIDE,
    }

    assert (predict.name, predict.fn, predict.batch_size, predict.batch_format) == (
        "predict",
        CamPredictor,
        48,
        "numpy",
    )
    assert (predict.num_cpus, predict.num_gpus, predict.actors) == (0.75, 0.5, 3) and predict.is_actor_pool
    assert predict.fn_constructor_args == (spec,)
    assert dict(predict.fn_constructor_kwargs) == {
        "method": "gradcam",
        "threshold": 0.3,
        "target": "label",
        "run_id": "run-1",
        "torch_threads": 5,
        "precision": "fp32",
    }

    # the same CPUs as the Parquet write after it, so that Ray Data fuses the two
    assert (localize.name, localize.fn, localize.batch_size, localize.batch_format) == (
        "localize",
        localize_batch,
        7,
        "pyarrow",
    )
    assert (localize.num_cpus, localize.num_gpus) == (0.5, 0.0)
    assert dict(localize.fn_kwargs) == {"heatmap_max_side": 300, "refine_method": REFINE_METHOD}


def test_plan_stages_without_refinement_or_earlier_runs():
    plain = RunConfig(data="d", output="o", model="resnet18", classes=["a", "b"])
    plan = plan_actors(plain, {"CPU": 4.0})
    decode, predict, localize = plan_stages(plain, plan, ModelSpec(), "r", {"input_size": 224, "refine": None})
    assert decode.fn_kwargs["refine_side"] is None and "skip_keys" not in decode.fn_kwargs
    assert localize.fn_kwargs["refine_method"] is None and localize.batch_size == Tuning().localize_rows
    assert (predict.num_gpus, predict.actors, predict.batch_size) == (0.0, 1, plan.batch_size)


def test_tuning_reaches_the_plan():
    tuning = Tuning(cpu_batch=7, gpu_batch=100, decode_rows=5, gpu_decode_rows=9, stage_cpus=2.0, min_stage_cpus=0.25)
    cpu = plan_actors(CFG, {"CPU": 16.0}, tuning=tuning)
    assert (cpu.batch_size, cpu.decode_rows, cpu.stage_cpus) == (7, 5, 2.0)
    gpu = plan_actors(CFG, {"CPU": 16.0, "GPU": 1.0}, tuning=tuning)
    assert (gpu.batch_size, gpu.decode_rows, gpu.stage_cpus) == (100, 9, 2.0)  # 100 // 8 = 12, capped at 9
    assert plan_actors(CFG, {"CPU": 16.0, "GPU": 1.0}, input_size=448, tuning=tuning).batch_size == 25
    # less than stage_cpus left beside the actors: min_stage_cpus, and refused only below that
    assert plan_actors(CFG, {"CPU": 2.5, "GPU": 1.0}, tuning=tuning).stage_cpus == 0.25
    assert plan_actors(CFG, {"CPU": 1.3, "GPU": 1.0}, tuning=tuning).stage_cpus == 0.25
    with pytest.raises(ValueError, match="none left for the decode"):
        plan_actors(CFG, {"CPU": 1.3, "GPU": 1.0})
    # the defaults are the plan's defaults
    assert plan_actors(CFG, {"CPU": 16.0}) == plan_actors(CFG, {"CPU": 16.0}, tuning=Tuning())


def _callables():
    """Two functions and a class for stages, defined here so that Ray ships them by value (the
    workers cannot import a test module)."""

    def add(batch, *, amount):
        return {"id": batch["id"] + amount}

    def double(batch):
        return {"id": batch["id"] * 2}

    class Scale:  # built once per actor with its constructor arguments
        def __init__(self, factor, *, offset=0):
            self.factor, self.offset = factor, offset

        def __call__(self, batch):
            return {"id": batch["id"] * self.factor + self.offset}

    return add, double, Scale


class _Reverse:
    """A stage of its own (anything with a name and apply): the rows in reverse order."""

    name = "reverse"

    def apply(self, dataset):
        return dataset.sort("id", descending=True)


def test_build_pipeline_applies_the_stages_in_order(ray_cluster):
    add, double, _ = _callables()
    ids = np.arange(20)
    stages = [
        Stage("add", add, fn_kwargs={"amount": 3}, batch_size=4, num_cpus=0.5),
        Stage("double", double, batch_size=None, num_cpus=0.5),
    ]
    out = build_pipeline(ray_cluster.data.range(20), stages).to_pandas()["id"].to_numpy()
    np.testing.assert_array_equal(np.sort(out), np.sort((ids + 3) * 2))
    out = build_pipeline(ray_cluster.data.range(20), stages[::-1]).to_pandas()["id"].to_numpy()
    np.testing.assert_array_equal(np.sort(out), np.sort(ids * 2 + 3))


def test_build_pipeline_with_an_actor_stage_and_a_stage_of_its_own(ray_cluster):
    add, _, scale = _callables()
    ids = np.arange(20)
    stages = [
        Stage("add", add, fn_kwargs={"amount": 1}, num_cpus=0.5),
        Stage(
            "scale",
            scale,
            fn_constructor_args=(3,),
            fn_constructor_kwargs={"offset": -2},
            batch_size=6,
            num_cpus=0.5,
            actors=1,
        ),
        _Reverse(),
    ]
    out = build_pipeline(ray_cluster.data.range(20), stages).to_pandas()["id"].to_numpy()
    np.testing.assert_array_equal(out, ((ids + 1) * 3 - 2)[::-1])
