"""How many threads apr's numpy work uses (the engine's row blocks, the dequantizers' shares), and
`share`, which splits one job among them."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from itertools import pairwise
from typing import Final

from apr.atomicfile import held_result, held_signals

MAX_THREADS: Final = 4  # numpy's per-call overhead holds the GIL; more threads stop paying


def default_threads() -> int:
    """The CPUs this process may run on, at most MAX_THREADS."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cpus))


def share(count: int, parts: int, run: Callable[[int, int], None]) -> None:
    """run(start, stop) over `parts` contiguous, near-equal ranges of range(count): the first on this
    thread, the others on a shared pool (numpy's heavy calls release the GIL); `run` must make each
    range's results depend on that range alone (the dequantizers' blocks do). Returns when every range
    is done; a worker's exception is raised here, and a Ctrl-C on this thread still waits for the
    workers (they stop writing into the output before it is dropped)."""
    bounds = [count * k // parts for k in range(parts + 1)]
    if parts <= 1:
        run(0, count)
        return
    with held_signals():
        helpers = [_pool().submit(run, a, b) for a, b in pairwise(bounds[1:])]
    try:
        run(bounds[0], bounds[1])
    finally:
        for future in helpers:
            held_result(future)


@cache
def _pool() -> ThreadPoolExecutor:
    """The helper threads of `share`, made when first needed (the calling thread is one more)."""
    return ThreadPoolExecutor(MAX_THREADS - 1, thread_name_prefix="apr-share")
