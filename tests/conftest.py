"""Shared fixtures: one real local Ray cluster for the whole session, real data paths."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ISIC2017_SAMPLE = REPO.parent / "shared" / "data" / "isic2017-sample"
ISIC2017_MINI = REPO / "tests" / "fixtures" / "isic2017-mini"


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: on 2 shared cores, 2 spinning OpenMP threads run 10-20x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (2 CPUs), started once and shared by every test that needs it."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def isic2017_sample() -> Path:
    if not ISIC2017_SAMPLE.exists():
        pytest.skip(f"shared ISIC 2017 sample not found at {ISIC2017_SAMPLE}")
    return ISIC2017_SAMPLE


@pytest.fixture(scope="session")
def isic2017_mini() -> Path:
    return ISIC2017_MINI
