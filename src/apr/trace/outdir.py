"""A trace's output directory, replaced whole: the new trace is written into a temporary sibling and swapped
in when complete, under a lock per directory.

    <parent>/.<name>.lock           held (flock) while a run writes <name>; a second run is refused
    <parent>/.<name>.apr-tmp-XXXX   the run being written; swapped with <parent>/<name> when complete

A symlink is followed: the swap happens at its target, and the link stays as it was. The new directory
takes the old one's permission bits and group (when the process may set it). The directory must be one a
rename can replace: not a mount point, nor the current directory or one that holds it (check_out_dir).

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

import errno
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from apr.atomicfile import blocking_file, held_signals
from apr.dirswap import (
    TMP_INFIX,
    catch_sigterm,
    drop_lock,
    lock_file,
    release_sigterm,
    remove_leftovers,
    swap_dirs,
    swap_target,
    take_lock,
    take_mode,
)
from apr.errors import AprIOError, ValidationError
from apr.stages import StageId
from apr.trace import format as aprt
from apr.trace.layout import MANIFEST_NAME, debris, is_layer_dir, stage_files, stage_id_for
from apr.trace.stats import FILE_NAME as STATS_FILE


def lock_path(out_dir: Path) -> Path:
    """The lock of `out_dir` (of its target, when it is a symlink)."""
    return lock_file(Path(os.path.realpath(out_dir)))


def check_out_dir(out: Path) -> Path:
    """Refuse, before any work, a trace directory that cannot be swapped in whole; return the real path
    the swap happens at (a symlink's target, so the link itself stays)."""
    if (blocker := blocking_file(out)) is not None:
        raise AprIOError(f"cannot create {out}: {blocker} is not a directory")
    return swap_target(
        out,
        f"output directory {out} exists and is not a directory",
        f"cannot write a trace to {out}: it is {{why}}, and a trace directory is replaced whole "
        "(choose another --save-tensor-dir)",
    )


def _cannot(what: str, path: Path, e: OSError) -> AprIOError:
    return AprIOError(f"cannot {what} {path}: {e.strerror or e}")


class OutputDir:
    """`open()` → the temporary directory to write into; then `commit()` or `abort()`; always `close()`."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir  # as given, for messages
        self.real = out_dir  # where the swap happens (check_out_dir), from `open`
        self.tmp: Path | None = None
        self.stale: dict[StageId, Path] = {}
        self._lock_fd: int | None = None
        self._sigterm = False

    def open(self) -> Path:
        """Check the old directory, take the lock, clear what killed runs left, make the temp dir."""
        out = self.real = check_out_dir(self.path)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _cannot("create", self._parent_shown(), e) from None
        self._lock_fd = take_lock(out, self.path, "choose another --save-tensor-dir")
        self._sigterm = catch_sigterm()
        try:
            return self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> Path:
        out = self.real
        self.stale = stage_files(self.path)  # through a symlink: the paths shown are the user's
        foreign = [p for p in self.stale.values() if not aprt.is_aprt(p)]
        if foreign:
            raise ValidationError(
                f"{foreign[0]} is named like a stage file but is not an APRT file; "
                "refusing to overwrite it (choose another --save-tensor-dir)"
            )
        _check_writable(self.path, self.stale.values())
        # a killed run's (we hold the lock); next to a symlink too, where runs before links were followed
        # left theirs (the link's name has no directory of its own, so no other run's temp is named so)
        remove_leftovers(*{out, self.path.absolute()})
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_INFIX}", dir=out.parent))
            take_mode(self.tmp, out)
        except OSError as e:
            raise _cannot("write to", self._parent_shown(), e) from None
        return self.tmp

    def _parent_shown(self) -> Path:
        """The folder the temporary directory and the lock go in, as the user named it (unless a link's)."""
        return self.real.parent if self.path.is_symlink() else self.path.parent

    def commit(self) -> None:
        """Carry the old directory's other files over, then swap the new trace in and drop the old one."""
        assert self.tmp is not None
        out, tmp = self.real, self.tmp
        if out.is_dir():
            try:
                _carry_over(out, tmp)
            except OSError as e:
                raise _cannot("write", self.path, e) from None
        with held_signals():  # the swap and its bookkeeping happen whole, or not at all
            try:
                if out.is_dir():
                    old = swap_dirs(tmp, out, f".{out.name}{TMP_INFIX}")
                    shutil.rmtree(old, ignore_errors=True)  # the old trace
                else:
                    os.rename(tmp, out)
            except OSError as e:
                raise _cannot("write", self.path, e) from None
            self.tmp = None

    def abort(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def close(self) -> None:
        self.abort()
        if self._lock_fd is not None:
            drop_lock(self.real, self._lock_fd)
            self._lock_fd = None
        if self._sigterm:
            release_sigterm()
            self._sigterm = False


def _check_writable(out: Path, stale: Iterable[Path]) -> None:
    """Refuse, as writing into it in place would, a directory (or a stale file's folder) we may not change:
    the swap itself needs only the parent's permissions, and must not override the directory's."""
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise AprIOError(f"cannot write to {out}: {os.strerror(errno.EACCES)}")
    for p in stale:
        if not os.access(p.parent, os.W_OK | os.X_OK):
            raise AprIOError(f"cannot remove stale trace file {p}: {os.strerror(errno.EACCES)}")


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
