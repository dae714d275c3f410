"""A trace's output directory, replaced whole: the new trace is written into a temporary sibling and swapped
in when complete, under a lock per directory.

    <parent>/.<name>.lock           held (flock) while a run writes <name>; a second run is refused
    <parent>/.<name>.apr-tmp-XXXX   the run being written; swapped with <parent>/<name> when complete

SIGINT, SIGTERM, a failed write (disk full) or an engine error remove the temporary directory; kill -9
leaves it behind, and the next run into the same directory removes it. (While a directory is open, SIGTERM
is handled as SIGINT is, by raising KeyboardInterrupt in the main thread, when its handler was the default
one; the default is restored by `close`.) Either way <name> holds the previous trace,
exactly as it was, or the new one: the swap is one rename (renameat2's RENAME_EXCHANGE when the old
directory exists; where the filesystem lacks it, two renames). Files in the old directory that are not
part of a trace (notes, other folders) are hard-linked into the new one, so they survive the swap. A kernel
crash is not covered: files are not fsynced.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from types import FrameType
from typing import Final

from apr.atomicfile import held_signals
from apr.errors import AprIOError, ValidationError
from apr.stages import StageId
from apr.trace import format as aprt
from apr.trace.layout import MANIFEST_NAME, debris, is_layer_dir, stage_files, stage_id_for
from apr.trace.stats import FILE_NAME as STATS_FILE

AT_FDCWD: Final = -100
RENAME_EXCHANGE: Final = 2
TMP_INFIX: Final = ".apr-tmp-"


def lock_path(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.lock"


def _cannot(what: str, path: Path, e: OSError) -> AprIOError:
    return AprIOError(f"cannot {what} {path}: {e.strerror or e}")


class OutputDir:
    """`open()` → the temporary directory to write into; then `commit()` or `abort()`; always `close()`."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir
        self.tmp: Path | None = None
        self.stale: dict[StageId, Path] = {}
        self._lock_fd: int | None = None
        self._sigterm = False

    def open(self) -> Path:
        """Check the old directory, take the lock, clear what killed runs left, make the temp dir."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise ValidationError(f"output directory {out} exists and is not a directory")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _cannot("create", out.parent, e) from None
        self._lock_fd = _lock(lock_path(out), out)
        self._sigterm = _catch_sigterm()
        try:
            return self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> Path:
        out = self.path
        self.stale = stage_files(out)
        foreign = [p for p in self.stale.values() if not aprt.is_aprt(p)]
        if foreign:
            raise ValidationError(
                f"{foreign[0]} is named like a stage file but is not an APRT file; "
                "refusing to overwrite it (choose another --save-tensor-dir)"
            )
        _check_writable(out, self.stale.values())
        for left in out.parent.glob(f".{out.name}{TMP_INFIX}*"):  # a killed run's; we hold the lock
            shutil.rmtree(left, ignore_errors=True)
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_INFIX}", dir=out.parent))
            os.chmod(self.tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give it mkdir's permissions
        except OSError as e:
            raise _cannot("write to", out.parent, e) from None
        return self.tmp

    def commit(self) -> None:
        """Carry the old directory's other files over, then swap the new trace in and drop the old one."""
        assert self.tmp is not None
        out, tmp = self.path, self.tmp
        if out.is_dir():
            try:
                _carry_over(out, tmp)
            except OSError as e:
                raise _cannot("write", out, e) from None
        with held_signals():  # the swap and its bookkeeping happen whole, or not at all
            try:
                if out.is_dir():
                    if not _exchange(tmp, out):
                        _swap_by_renames(tmp, out)
                    shutil.rmtree(tmp, ignore_errors=True)  # now the old trace
                else:
                    os.rename(tmp, out)
            except OSError as e:
                raise _cannot("write", out, e) from None
            self.tmp = None

    def abort(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def close(self) -> None:
        self.abort()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(lock_path(self.path))  # before unlocking: see _lock
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self._sigterm = False


def _catch_sigterm() -> bool:
    """Turn SIGTERM into KeyboardInterrupt (once; later ones are ignored until `close`), so the cleanup
    that SIGINT gets runs. Only from the main thread, and only over the default handler."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return False
    signal.signal(signal.SIGTERM, _terminated)
    return True


def _terminated(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise KeyboardInterrupt("terminated")


def _check_writable(out: Path, stale: Iterable[Path]) -> None:
    """Refuse, as writing into it in place would, a directory (or a stale file's folder) we may not change:
    the swap itself needs only the parent's permissions, and must not override the directory's."""
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise AprIOError(f"cannot write to {out}: {os.strerror(errno.EACCES)}")
    for p in stale:
        if not os.access(p.parent, os.W_OK | os.X_OK):
            raise AprIOError(f"cannot remove stale trace file {p}: {os.strerror(errno.EACCES)}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _lock(path: Path, out: Path) -> int:
    """flock the lock file (released by the kernel when the process dies, even by kill -9). A holder
    unlinks the file before unlocking, so a lock taken on an unlinked file is retried on the new one."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise _cannot("write to", path.parent, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AprIOError(
                f"another apr run is writing {out} (it holds {path}); wait for it or choose another "
                "--save-tensor-dir"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (or copy) what the old directory holds besides the trace into the new one."""
    left = set(debris(old))  # a cut-short run's temp files are not carried over
    for p in sorted(old.rglob("*")):
        rel = p.relative_to(old)
        trace_file = rel.as_posix() in (MANIFEST_NAME, STATS_FILE) or stage_id_for(rel) is not None
        skip = trace_file or rel.as_posix() in left
        if skip or (new / rel).exists():
            continue
        if p.is_dir() and not p.is_symlink():
            if not is_layer_dir(rel):  # a layer folder comes with the files it holds, if any
                (new / rel).mkdir(parents=True, exist_ok=True)
            continue
        (new / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(p, new / rel, follow_symlinks=False)
        except OSError:
            shutil.copy2(p, new / rel, follow_symlinks=False)


# the C library through the process's own symbols (ctypes.util.find_library would run ldconfig: ~6 ms)
_LIBC: Final = ctypes.CDLL(None, use_errno=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where that is unavailable."""
    fn = getattr(_LIBC, "renameat2", None)
    if fn is None:
        return False
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_by_renames(tmp: Path, out: Path) -> None:
    """old → a temp name, new → out, then the temp name holds the old trace (for the caller to remove)."""
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_INFIX}", dir=out.parent))
    os.rename(out, aside / "old")
    os.rename(tmp, out)
    os.rename(aside, tmp)
