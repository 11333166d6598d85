"""Shared fixtures.

``ray_session``: ONE private local Ray instance (``address="local"``, never a cluster that
happens to run on the machine) for the whole test session (``num_cpus=2``, no
dashboard), shared by every test that needs Ray; started on first use, shut down at the end.
Tests must not call ``ray.init``/``ray.shutdown`` themselves.

The user cache directory (``$CUGAN_CACHE_DIR``: inference path measurements, the score cache,
registry downloads) is a fresh temporary directory for the session, inherited by the stages and
servers the tests start, unless the environment names one: a test run neither reads what an
earlier run or the user's own work left there nor leaves anything behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_SESSION_CACHE: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    if not os.environ.get("CUGAN_CACHE_DIR"):
        _SESSION_CACHE.append(tempfile.mkdtemp(prefix="cugan-test-cache-"))
        os.environ["CUGAN_CACHE_DIR"] = _SESSION_CACHE[0]


def pytest_unconfigure(config: pytest.Config) -> None:
    for path in _SESSION_CACHE:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_session():
    ray = pytest.importorskip("ray")
    from pipeline.ray_runtime import ensure_ray

    started = ensure_ray(None, num_cpus=2)
    yield ray
    if started:
        ray.shutdown()
