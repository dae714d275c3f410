"""bench/long.py's scratch directory: ext4's "top of a directory hierarchy" flag, set and read back."""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

from tests.bench import load_bench

long_bench = load_bench("long")


def test_spread_subdirectories_sets_the_topdir_flag_or_says_it_cannot(tmp_path: Path) -> None:
    before = _flags(tmp_path)
    if long_bench.spread_subdirectories(tmp_path):
        assert _flags(tmp_path) == before | long_bench.FS_TOPDIR_FL  # the flag, and only it, added
    else:
        assert _flags(tmp_path) == before


def _flags(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, long_bench.FS_IOC_GETFLAGS, buf)
        return int.from_bytes(buf, sys.byteorder)
    finally:
        os.close(fd)
