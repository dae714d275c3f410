"""Atomic file output: write to a temporary sibling, fsync, then rename over the final name.

A killed writer leaves at most a `.<name>.tmp-*` file, never a half-written file under the final name; SIGINT
and SIGTERM (in the main thread, over SIGTERM's default action) remove it too, and only kill -9 leaves it.
The next write of the same name removes such a leftover: a writer holds an flock on its temporary file until
the rename (the kernel drops it when the process dies), so a `.<name>.tmp-*` file whose lock can be taken,
and which is older than the moment between its creation and its lock, is a dead writer's.
The temporary name is an implementation detail: a failure to create, write or rename it is reported as
`AprIOError("cannot write <final path>: <reason>")`, never with the temp file's name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, BinaryIO, Final, TypeVar

from apr.dirswap import catch_sigterm, release_sigterm
from apr.errors import AprIOError

T = TypeVar("T")

TMP_INFIX: Final = ".tmp-"  # .<name>.tmp-XXXX: the file being written
DEAD_AFTER_S: Final = 2.0  # a temp file whose lock is free is a dead writer's once it is this old

# `signal.signal` without its enum wrapping: the C function `signal.signal` itself calls, which returns
# the old handler as is (an int for SIG_DFL/SIG_IGN). signal.signal converts it with `Handlers(value)`,
# which raises and catches a ValueError for every Python handler: 4 µs a call against 0.3 (held_signals
# 16 → 4.4 µs; a 7-token SmolLM2 trace holds signals ~500 times on its main thread).
_set_handler: Callable[[int, Any], Any]
try:
    from _signal import signal as _set_handler  # type: ignore[import-not-found,no-redef]
except ImportError:  # not CPython
    _set_handler = signal.signal


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK: Final = _current_umask()


def _cannot_write(path: Path, e: OSError) -> AprIOError:
    return AprIOError(f"cannot write {path}: {e.strerror or e}")


def blocking_file(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` when it is not a directory (so `path` cannot be made: mkdir
    says only EEXIST or ENOTDIR, naming neither the file nor the path); None when there is none."""
    for p in path.parents:
        if p.is_symlink() or p.exists():
            return None if p.is_dir() else p
    return None


def _under_file(path: Path) -> AprIOError | None:
    blocker = blocking_file(path)
    return None if blocker is None else AprIOError(f"cannot write {path}: {blocker} is not a directory")


def check_writable_path(path: Path) -> None:
    """Refuse up front, before the work that produces it, a file path that cannot be written: one under
    a file, or an existing directory."""
    if (under_file := _under_file(path)) is not None:
        raise under_file
    if path.is_dir():
        raise AprIOError(f"cannot write {path}: {os.strerror(errno.EISDIR)}")


def make_parent(path: Path) -> None:
    """Create `path`'s parent directories; an error names `path` (and the file in the way, if any)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _under_file(path) or _cannot_write(path, e) from e


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise _cannot_write(path, e) from e


class AtomicFile:
    """The temp file handed to the caller: `write` and `flush` errors name the final path."""

    def __init__(self, f: BinaryIO, path: Path) -> None:
        self._f, self._path = f, path

    def write(self, data: bytes | bytearray | memoryview) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            raise _cannot_write(self._path, e) from e

    def flush(self) -> None:
        with _naming(self._path):
            self._f.flush()


@contextlib.contextmanager
def atomic_output(path: Path, *, fsync: bool = False) -> Iterator[AtomicFile]:
    """Open a temp file next to `path`; on clean exit rename it to `path`, on error remove it.

    Errors raised by the caller's own code inside the block pass through unchanged.
    """
    make_parent(path)
    with _naming(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_INFIX}", dir=path.parent)
    f = os.fdopen(fd, "wb")
    sigterm = catch_sigterm()  # SIGTERM, as SIGINT, then removes the temp file (below) instead of leaving it
    try:
        with _naming(path):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours until the rename: see remove_dead_temps
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
        remove_dead_temps(path)
        yield AtomicFile(f, path)
        with _naming(path):
            f.flush()
            if fsync:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            f.close()
    except BaseException:
        with contextlib.suppress(OSError):
            f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        if sigterm:
            release_sigterm()


def remove_dead_temps(path: Path) -> None:
    """Remove the temporary files killed writers of `path` left: those whose flock can be taken (no live
    writer holds it) and that are older than `DEAD_AFTER_S` (a writer takes its lock just after creating
    the file). Best effort: what cannot be opened or removed stays."""
    now = time.time()
    for left in path.parent.glob(f".{glob.escape(path.name)}{TMP_INFIX}*"):
        try:
            fd = os.open(left, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and now - st.st_mtime > DEAD_AFTER_S:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.unlink(left)
        except OSError:  # BlockingIOError: a live writer's
            pass
        finally:
            os.close(fd)


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive in the block are delivered when it ends, so the KeyboardInterrupt
    their Python handlers raise cannot land inside it: not between the steps of a swap that must happen
    whole, nor inside threading's own locks (an interrupted `Future.result()` can leave a condition's lock
    held, and the process then hangs at exit joining the thread that waits for it). Python runs signal
    handlers in the main thread only; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = {s: _set_handler(s, lambda n, _: caught.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in held.items():
            _set_handler(s, signal.SIG_DFL if handler is None else handler)
        for n in dict.fromkeys(caught):
            signal.raise_signal(n)


def held_result(future: Future[T], poll: float = 0.1) -> T:
    """`future.result()`, waited for in `poll`-second slices with signals held (held_signals): a Ctrl-C
    never lands inside the future's lock, and is still acted on within `poll` seconds."""
    while True:
        with held_signals():
            try:
                return future.result(timeout=poll)
            except TimeoutError:
                pass


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_output(path) as f:
        f.write(data)
