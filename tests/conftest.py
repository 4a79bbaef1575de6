"""Shared fixtures. One local Ray instance per test process serves every test of that process that needs Ray (its
startup costs seconds). `make test` runs two test processes (pytest-xdist, `-n 2`): most tests keep one core busy at
most, so the second process fills the other core."""

import os

import pytest

# Keep test processes single-threaded in torch and quiet in Ray.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
