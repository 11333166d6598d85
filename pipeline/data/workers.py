"""An order-preserving process pool map with a bounded number of tasks in flight.

Decoding and PNG-encoding 2K images is CPU-bound, so the data stages spread images over
processes; results come back in input order, so outputs do not depend on the worker count.
``concurrent.futures.Executor.map`` submits every task at once and would buffer all finished
results while an early one is still running; the window here bounds that memory.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import TypeVar

__all__ = ["ordered_map", "resolve_workers"]

T = TypeVar("T")
R = TypeVar("R")

#: Fewer items than this run in the calling process: a pool costs more than it saves.
MIN_ITEMS_FOR_POOL = 16


def resolve_workers(workers: int) -> int:
    """``workers <= 0`` means one per CPU core, at most 8."""
    if workers > 0:
        return workers
    return max(1, min(os.cpu_count() or 1, 8))


def ordered_map(fn: Callable[[T], R], items: Sequence[T], *, workers: int) -> Iterator[R]:
    """``map(fn, items)`` over ``workers`` processes (spawned: safe after torch/threads)."""
    if workers <= 1 or len(items) < MIN_ITEMS_FOR_POOL:
        yield from map(fn, items)
        return
    window = 2 * workers
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending: deque[Future[R]] = deque()
        it = iter(items)
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                break
        while pending:
            result = pending.popleft().result()
            for item in it:
                pending.append(pool.submit(fn, item))
                break
            yield result
