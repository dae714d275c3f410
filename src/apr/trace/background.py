"""One thread that runs the trace writer's file jobs in order, while the forward pass goes on.

Writing a stage file (create, write, sha256) costs as much as computing it at short prompts, and 2.8 GB of
them at 2048 tokens; on this thread it overlaps the engine's single-threaded stretches. Each job owns its
data (the writer hands over a copy), so nothing the engine does later can change what is written. At most
`limit` bytes wait at once: `submit` blocks the engine until the thread catches up, so memory stays bounded.
The first exception a job raises is re-raised in the caller's thread by the next `submit` or by `drain`,
and no later job runs; `close` drops what is still queued and joins the thread.

The caller's side runs with SIGINT and SIGTERM held (apr.atomicfile.held_signals): a KeyboardInterrupt
that lands inside threading's Condition code — after `__enter__` took the lock but before the `with`
block began, say — leaves the lock taken, and `close` then waited forever for a thread that could never
wake (`apr trace` hung at exit after a Ctrl-C; 29 of 60 interrupted rounds in
tests/trace/test_background.py's stress before this). A held signal is delivered as the call returns:
after at most the queued writes (≤ `limit` bytes, plus one stage larger than that).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Final

from apr.atomicfile import held_signals

DEFAULT_LIMIT: Final = 64 << 20  # bytes queued at most


class BackgroundJobs:
    def __init__(self, limit: int = DEFAULT_LIMIT, name: str = "apr-writer") -> None:
        self._limit = limit
        self._jobs: deque[tuple[Callable[[], None], int]] = deque()
        self._pending = 0  # bytes of the queued jobs and the one running
        self._unfinished = 0  # those jobs
        self._error: BaseException | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None], nbytes: int) -> None:
        """Queue `job` (whose data is `nbytes`); waits while more than `limit` bytes are queued."""
        with held_signals(), self._cond:
            while self._pending and self._pending + nbytes > self._limit and self._error is None:
                self._cond.wait()
            self._raise()
            self._jobs.append((job, nbytes))
            self._pending += nbytes
            self._unfinished += 1
            self._cond.notify_all()

    def drain(self) -> None:
        """Wait until every queued job has run; re-raise the first failure."""
        with held_signals(), self._cond:
            while self._unfinished and self._error is None:
                self._cond.wait()
            self._raise()

    def close(self) -> None:
        """Drop the jobs not yet started, wait for the running one, stop the thread."""
        with held_signals():
            with self._cond:
                self._closed = True
                self._jobs.clear()
                self._cond.notify_all()
            self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job, nbytes = self._jobs.popleft()
            try:
                job()
            except BaseException as e:  # handed to the caller's thread, never lost
                with self._cond:
                    self._error = e
                    self._jobs.clear()
                    self._pending = self._unfinished = 0
                    self._cond.notify_all()
                return
            with self._cond:
                self._pending -= nbytes
                self._unfinished -= 1
                self._cond.notify_all()
