"""Shared fixtures.

``ray_session``: ONE private local Ray instance (``address="local"``, never a cluster that
happens to run on the machine) for the whole test session (``num_cpus=2``, no
dashboard), shared by every test that needs Ray; started on first use, shut down at the end.
Tests must not call ``ray.init``/``ray.shutdown`` themselves.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_session():
    ray = pytest.importorskip("ray")
    from pipeline.ray_runtime import ensure_ray

    started = ensure_ray(None, num_cpus=2)
    yield ray
    if started:
        ray.shutdown()
