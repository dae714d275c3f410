"""What apr opens: regular files only, read whole only under a size limit, and paths from files confined.

- `regular(path)` stats first (following symlinks) and refuses FIFOs, devices, sockets and directories, so a
  FIFO model path cannot hang and a `.gguf` symlink to /dev/zero is never read; a symlink loop says so.
- `read_regular(path, limit)` is the one whole-file read, refused above `limit` bytes.
- `confined(root, rel, where)` resolves a path named inside a file (manifest entry, shard index) and refuses
  one that leaves `root`; the error names the path, never the target's contents.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from apr.errors import AprIOError, FormatError, NotFoundError

NAME_MAX, PATH_MAX = 255, 4096  # Linux's limits, in bytes: longer names fail every call with ENAMETOOLONG
_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def stat_path(path: Path) -> os.stat_result:
    """`os.stat` with apr's errors: not found, a symlink loop, or unreadable."""
    try:
        return path.stat()
    except FileNotFoundError:
        raise NotFoundError(f"File not found: {path}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FormatError(f"{path}: symlink loop") from None
        raise AprIOError(f"cannot stat {path}: {e.strerror or e}") from None


def kind(st: os.stat_result) -> str | None:
    """What a non-regular file is ("a FIFO", ...), or None for a regular file."""
    for test, name in _KINDS:
        if test(st.st_mode):
            return name
    return None if stat.S_ISREG(st.st_mode) else "a special file"


def regular(path: Path, allow_dir: bool = False) -> os.stat_result:
    """The stat of `path`, which must be a regular file (or, with `allow_dir`, a directory)."""
    st = stat_path(path)
    if allow_dir and stat.S_ISDIR(st.st_mode):
        return st
    if (what := kind(st)) is not None:
        raise FormatError(f"{path}: is {what}, not a regular file")
    return st


def read_regular(path: Path, limit: int) -> bytes:
    """The whole of the regular file `path`, refused (before reading) when larger than `limit` bytes."""
    size = regular(path).st_size
    if size > limit:
        raise FormatError(f"{path}: {size} bytes, more than the {limit} this file may have")
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise AprIOError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise FormatError(f"{path}: grew past {limit} bytes while being read")
    return data


def confined(root: Path, rel: str, where: str) -> Path:
    """`root / rel`, which must stay inside `root` after resolving `..` and symlinks."""
    if not rel or "\0" in rel or Path(rel).is_absolute():
        raise FormatError(f"{where}: path '{shown(rel)}' must be relative to {root}")
    if len(rel.encode(errors="replace")) > PATH_MAX or any(
        len(p.encode(errors="replace")) > NAME_MAX for p in Path(rel).parts
    ):
        raise FormatError(f"{where}: path '{shown(rel)}' is longer than a file name may be")
    try:
        base = root.resolve()
        target = (root / rel).resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop on older Pythons
        raise FormatError(f"{where}: cannot resolve '{shown(rel)}': {e}") from None
    if not target.is_relative_to(base):
        raise FormatError(f"{where}: path '{shown(rel)}' leaves {root}")
    return root / rel


def printable(name: str, what: str) -> str:
    """A name read from a file (tensor, key), refused when it holds control characters: every message
    that names it stays one line, and no real checkpoint has such a name."""
    if not name.isprintable():
        raise FormatError(f"{what}: name '{shown(name)}' holds control characters")
    return name


def shown(text: str, limit: int = 80) -> str:
    """A name read from a file as an error message shows it: control characters escaped (one line), cut."""
    out = text if text.isprintable() else repr(text)[1:-1]
    return out if len(out) <= limit else out[:limit] + "…"
