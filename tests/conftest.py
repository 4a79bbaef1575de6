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


def pytest_collection_modifyitems(config, items):
    """Tests marked slow (minutes each) first, in their collected order, then the rest. With `make test`'s
    `--maxschedchunk 1` each test process takes the next test when it finishes one (pytest-xdist's default hands out
    a quarter of a process's share at once, which gave one process every slow test), so the two processes share the
    long tests and finish on short ones. Every test process sorts the same collection the same way, as pytest-xdist
    requires."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
