"""How many threads apr's numpy work uses: the engine's row blocks and the dequantizers' shares."""

from __future__ import annotations

import os
from typing import Final

MAX_THREADS: Final = 4  # numpy's per-call overhead holds the GIL; more threads stop paying


def default_threads() -> int:
    """The CPUs this process may run on, at most MAX_THREADS."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cpus))
