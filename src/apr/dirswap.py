"""Directories replaced whole: the pieces a trace directory (apr.trace.outdir) and an export folder
(apr.convert.outfolder) share. The new contents are written into a temporary sibling, which takes the old
directory's place in one step when complete.

`real_target` is where the swap happens (a symlink's target: the link stays); `swap_target` refuses one
that is a file or `unswappable` (the root, a mount point, the current directory or one holding it);
`take_mode` gives the new directory the old one's permission bits and group; `swap_dirs` is the swap
itself (renameat2's RENAME_EXCHANGE, or two renames where the filesystem lacks it); `catch_sigterm` makes
SIGTERM raise KeyboardInterrupt as SIGINT does while the temporary directory exists, so it is removed.

A run holds `<parent>/.<name>.lock` (flock, `take_lock`) while it writes `<name>`, so a second run into
the same directory is refused rather than mixed in, and under that lock `remove_leftovers` clears the
`.<name>.apr-tmp-*` siblings a killed run (kill -9) left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import os
import shutil
import signal
import stat
import tempfile
import threading
from functools import cache
from pathlib import Path
from types import FrameType
from typing import Any, Final

from apr.errors import AprIOError, ValidationError

AT_FDCWD: Final = -100
RENAME_EXCHANGE: Final = 2
TMP_INFIX: Final = ".apr-tmp-"  # <parent>/.<name>.apr-tmp-XXXX: the directory being written


def real_target(out: Path) -> Path:
    """The real path a swap of `out` happens at (a symlink's target); a symlink loop is an AprIOError."""
    real = Path(os.path.realpath(out))
    if real.is_symlink():  # realpath leaves a loop as it is
        raise AprIOError(f"cannot write {out}: {os.strerror(errno.ELOOP)}")
    return real


def swap_target(out: Path, not_a_dir: str, refusal: str) -> Path:
    """`real_target(out)`, refused with ValidationError(`not_a_dir`) when it is a file and with
    ValidationError(`refusal` formatted with `why`) when it is `unswappable`."""
    real = real_target(out)
    if real.exists() and not real.is_dir():
        raise ValidationError(not_a_dir)
    if (why := unswappable(real)) is not None:
        raise ValidationError(refusal.format(why=why))
    return real


def unswappable(real: Path) -> str | None:
    """Why a rename cannot (or must not) replace the directory at `real`, if it cannot."""
    if real == real.parent:
        return "the root directory"
    if os.path.ismount(real):
        return "a mount point"
    try:
        cwd = Path(os.path.realpath(os.getcwd()))
    except OSError:  # the current directory was removed: nothing to protect
        return None
    if cwd == real:
        return "the current directory"
    if real in cwd.parents:  # the swap would leave the current directory inside the removed old one
        return "a parent of the current directory"
    return None


def take_mode(tmp: Path, old: Path) -> None:
    """Give the new directory the old one's permission bits and group (a private directory stays private),
    or mkdir's permissions when there is no old one (mkdtemp makes 0700). Only the owner or root may set
    the group; elsewhere it stays the process's."""
    try:
        st = old.stat()
    except FileNotFoundError:
        os.chmod(tmp, 0o777 & ~umask())
        return
    with contextlib.suppress(PermissionError):
        os.chown(tmp, -1, st.st_gid)  # before chmod: chown may clear the set-group-ID bit
    os.chmod(tmp, stat.S_IMODE(st.st_mode))


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def swap_dirs(new: Path, old: Path, prefix: str) -> Path:
    """Put directory `new` in the place of directory `old` in one step, and return a path that holds the
    old contents, for the caller to remove. Two renames where renameat2's exchange is unavailable (via a
    `prefix`ed temporary sibling; the old directory is put back if the second rename fails)."""
    if exchange(new, old):
        return new
    aside = Path(tempfile.mkdtemp(prefix=prefix, dir=old.parent))
    os.rename(old, aside / "old")
    try:
        os.rename(new, old)
    except OSError:
        os.rename(aside / "old", old)
        os.rmdir(aside)
        raise
    return aside


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where that is unavailable."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@cache
def _renameat2() -> Any:
    # the C library through the process's own symbols (ctypes.util.find_library would run ldconfig: ~6 ms)
    return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)


def catch_sigterm() -> bool:
    """Turn SIGTERM into KeyboardInterrupt (once; later ones are ignored until `release_sigterm`), so the
    cleanup that SIGINT gets runs. Only from the main thread, and only over the default handler; True when
    it was installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return False
    signal.signal(signal.SIGTERM, _terminated)
    return True


def release_sigterm() -> None:
    """SIGTERM's default action again (after a `catch_sigterm` that returned True)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _terminated(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise KeyboardInterrupt("terminated")


def lock_file(real: Path) -> Path:
    """The lock of the directory at `real` (a real path: a symlink's target)."""
    return real.parent / f".{real.name}.lock"


def take_lock(real: Path, out: Path, instead: str) -> int:
    """flock `lock_file(real)` and return its descriptor; another run holding it is an AprIOError naming
    `out` and ending "wait for it or {instead}". The kernel releases the lock when the process dies, even
    by kill -9. A holder unlinks the file before unlocking (`drop_lock`), so a lock taken on an unlinked
    file is retried on the new one."""
    path = lock_file(real)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise AprIOError(f"cannot write to {path.parent}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AprIOError(
                f"another apr run is writing {out} (it holds {path}); wait for it or {instead}"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def drop_lock(real: Path, fd: int) -> None:
    """Release a `take_lock`: the file is unlinked first (see there), then unlocked."""
    with contextlib.suppress(OSError):
        os.unlink(lock_file(real))
    os.close(fd)


def remove_leftovers(*targets: Path) -> None:
    """Remove the temporary directories killed runs left beside each target (call with its lock held: no
    live run's directory is named so). Only a link is removed where one is a symlink, never what it
    points at."""
    for where in targets:
        for left in where.parent.glob(f".{glob.escape(where.name)}{TMP_INFIX}*"):
            if left.is_dir() and not left.is_symlink():
                shutil.rmtree(left, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    left.unlink()
