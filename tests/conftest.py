"""Shared fixtures.

``ray_session``: ONE local Ray instance for the whole test session (``num_cpus=2``, no
dashboard), shared by every test that needs Ray; started on first use, shut down at the end.
Tests must not call ``ray.init``/``ray.shutdown`` themselves.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_session():
    ray = pytest.importorskip("ray")
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
        started = True
    yield ray
    if started:
        ray.shutdown()
