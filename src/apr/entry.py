"""The `apr` console script and `python -m apr`: the CLI, with a Ctrl-C that lands while the CLI's modules
are still being imported (before any command runs) reported as every other interrupt is — one
`error: interrupted` line and exit 130 — instead of a Python traceback, and an exit that skips the
interpreter's teardown (`leave`)."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import sys
import threading
from typing import NoReturn

INTERRUPTED = 130  # as apr.cli.app.INTERRUPTED; this module must not import the CLI before it can fail
# glibc's mallopt parameters (malloc.h) and the values the CLI process runs with
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for it (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 256 << 20


def run() -> NoReturn:
    """The console script: the CLI, then the process's exit with its status (`leave`)."""
    leave(call())


def call() -> int:
    """Run the CLI in this process on `sys.argv` and return its exit status, the process going on."""
    keep_freed_memory()
    try:
        from apr.cli import main

        main()
    except KeyboardInterrupt:  # while importing, or outside a command's invoke (which reports its own)
        os.write(2, b"error: interrupted\n")
        return INTERRUPTED
    except SystemExit as done:
        return exit_status(done.code)
    return 0


def exit_status(code: object) -> int:
    """The status `sys.exit(code)` gives the process: None → 0, an int as it is, anything else printed
    to stderr and 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return int(code)  # a bool too
    print(code, file=sys.stderr)
    return 1


def leave(status: int) -> NoReturn:
    """End the process with `status`, doing what the interpreter's own exit does that anyone can see —
    wait for the threads that are not daemons, run the atexit handlers, flush stdout and stderr — but
    not its teardown of every module and object: a final garbage collection of ~28k objects, 13–22 ms
    of a 7-token trace's ~0.5 s. Every file the CLI writes is closed (and renamed into place) before
    its command returns. Where this Python lacks either hook, the interpreter's own exit."""
    join_threads = getattr(threading, "_shutdown", None)
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if join_threads is None or run_exit_handlers is None:
        sys.exit(status)
    try:
        join_threads()
        run_exit_handlers()
    except KeyboardInterrupt:  # Ctrl-C while waiting for a thread or a handler: one line, not a traceback
        os.write(2, b"error: interrupted\n")
        status = INTERRUPTED
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader that went away: nothing more to say
            stream.flush()
    os._exit(status)


def keep_freed_memory() -> None:
    """Let the process reuse the memory numpy frees instead of handing it back to the kernel.

    A forward pass allocates and frees arrays of a few MiB thousands of times. glibc serves each one above
    its mmap threshold (128 KiB, raised only as far as the largest block freed so far) with a fresh mmap,
    and gives freed heap back past 128 KiB at the top: every array is then page-faulted in and zeroed by
    the kernel anew. Blocks up to 32 MiB from the heap, and up to 256 MiB of free heap kept, took a
    2048-token SmolLM2 trace from 18.1 s (8.8 s of it system time) to 13.5 s (2.8 s), for 24 MiB more
    peak RSS. Other C libraries keep their own defaults.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
