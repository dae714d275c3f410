"""One thread that runs the trace writer's file jobs in order, while the forward pass goes on.

Writing a stage file (create, write, sha256) costs as much as computing it at short prompts, and 2.8 GB of
them at 2048 tokens; on this thread it overlaps the engine's single-threaded stretches. Each job owns its
data (the writer hands over a copy), so nothing the engine does later can change what is written. At most
`limit` bytes wait at once: `submit` blocks the engine until the thread catches up, so memory stays bounded.
The first exception a job raises is re-raised in the caller's thread by the next `submit` or by `drain`,
and no later job runs; `close` drops what is still queued and joins the thread.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Final

DEFAULT_LIMIT: Final = 64 << 20  # bytes queued at most


class BackgroundJobs:
    """Wake-ups are counted: a thread is notified only when it waits for exactly that (the file thread for
    work, a submitter for room, a drain for the end), and the file thread takes every queued job at once,
    so ~480 stage files are not ~480 wake-ups of a sleeping thread (a 1-2 % gain at 7 tokens, measured)."""

    def __init__(self, limit: int = DEFAULT_LIMIT, name: str = "apr-writer") -> None:
        self._limit = limit
        self._jobs: deque[tuple[Callable[[], None], int]] = deque()
        self._pending = 0  # bytes of the queued jobs and the ones running
        self._unfinished = 0  # those jobs
        self._error: BaseException | None = None
        self._closed = False
        self._idle = False  # the file thread waits for work
        self._blocked = 0  # submitters waiting for room
        self._draining = 0  # callers of drain waiting
        lock = threading.Lock()
        self._work, self._room, self._done = (threading.Condition(lock) for _ in range(3))
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None], nbytes: int) -> None:
        """Queue `job` (whose data is `nbytes`); waits while more than `limit` bytes are queued."""
        with self._work:
            while self._pending and self._pending + nbytes > self._limit and self._error is None:
                self._blocked += 1
                try:
                    self._room.wait()
                finally:
                    self._blocked -= 1
            self._raise()
            self._jobs.append((job, nbytes))
            self._pending += nbytes
            self._unfinished += 1
            if self._idle:
                self._work.notify()

    def drain(self) -> None:
        """Wait until every queued job has run; re-raise the first failure."""
        with self._work:
            while self._unfinished and self._error is None:
                self._draining += 1
                try:
                    self._done.wait()
                finally:
                    self._draining -= 1
            self._raise()

    def close(self) -> None:
        """Drop the jobs not yet started, wait for the running one, stop the thread."""
        with self._work:
            self._closed = True
            self._jobs.clear()
            self._work.notify()
        self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            with self._work:
                while not self._jobs and not self._closed:
                    self._idle = True
                    try:
                        self._work.wait()
                    finally:
                        self._idle = False
                if self._closed:
                    return
                batch = list(self._jobs)
                self._jobs.clear()
            for job, nbytes in batch:
                try:
                    job()
                except BaseException as e:  # handed to the caller's thread, never lost
                    with self._work:
                        self._error = e
                        self._jobs.clear()
                        self._pending = self._unfinished = 0
                        self._room.notify_all()
                        self._done.notify_all()
                    return
                with self._work:
                    if self._closed:  # close() drops what was queued, the rest of this batch too
                        return
                    self._pending -= nbytes
                    self._unfinished -= 1
                    if self._blocked:
                        self._room.notify_all()
                    if self._draining and not self._unfinished:
                        self._done.notify_all()
