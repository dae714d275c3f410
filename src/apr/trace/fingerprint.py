"""The model fingerprint a manifest records (sha256 and size of the model's bytes), and a cache of them.

Hashing is one core's work at ~1 GB/s: a 4.7 GB 7B file takes 4-10 s of a core beside the forward pass,
which made a 10-token trace of it 2 s slower on two cores (11.7 → 14 s). Fingerprints are therefore kept in
`fingerprints.json` in apr's cache directory ($APR_CACHE, else $XDG_CACHE_HOME/apr, else ~/.cache/apr;
`APR_CACHE=off` hashes every time), keyed by the model's resolved path and, for each of its files, the
relative name, device, inode, size, mtime_ns and ctime_ns.

ctime cannot be set by a user and moves on every write, rename or chmod, so a file changed after it was
hashed has a new key — as long as the change is later than the timestamp's granularity. As git does for
"racy" index entries, a hash is cached only when every file's ctime was at least RACY_NS old when hashing
began and every key is the same after hashing as before (nothing changed under the hash). A cache file
that is not what apr writes, or that cannot be read or written, is ignored: the model is hashed as if there
were no cache. Writes are atomic (apr.atomicfile: a temporary file renamed over it); concurrent runs may
each write, and the last one wins, which loses at most a cache entry, never gives a wrong one.

The same read checks an .apr file's footer CRC32 (formats/aprfooter.py `FooterCrc`, fed the chunks the sha256
reads; a file is one by its magic), and the verdict is kept in the cache entry beside the hash: a file found
corrupt stays corrupt while its keys are unchanged. `intact(path)` is the fingerprint of a model whose
checksum holds, else a FormatError naming the file and the mismatch: a trace takes it beside its forward
pass and commits nothing when it fails; `apr convert` / `apr export` take `check_intact` before converting.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from apr.atomicfile import write_bytes_atomic
from apr.errors import AprError
from apr.formats.aprcodec import MAGIC as APR_MAGIC
from apr.formats.aprfooter import FooterCheck, FooterCrc
from apr.formats.files import read_regular

HASH_CHUNK: Final = 8 << 20
CACHE_ENV: Final = "APR_CACHE"
CACHE_OFF: Final = "off"
CACHE_NAME: Final = "fingerprints.json"
CACHE_SCHEMA: Final = "apr-fingerprints/2"  # 2: entries carry the footer verdict
MAX_ENTRIES: Final = 256  # the most recently used are kept
MAX_CACHE_BYTES: Final = 1 << 20  # a larger file is not apr's: ignored
RACY_NS = 2_000_000_000  # a module variable: tests shorten it

FileKey = list[Any]  # [relative name, st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns]
CRC_MAX: Final = 1 << 32


@dataclass(frozen=True, slots=True)
class Fingerprint:
    sha256: str
    bytes: int
    footer: FooterCheck | None = None  # an .apr file's footer CRC32; None: the model keeps no such checksum

    def check(self, path: Path) -> None:
        """Raise FormatError (naming `path` and the mismatch) when the model's checksum failed."""
        if self.footer is not None and not self.footer.ok:
            raise self.footer.error(str(path))


def cache_file() -> Path | None:
    """Where fingerprints are cached, or None when caching is off."""
    env = os.environ.get(CACHE_ENV)
    if env == CACHE_OFF:
        return None
    if env:
        return Path(env) / CACHE_NAME
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "apr" / CACHE_NAME


def model_files(path: Path) -> list[Path]:
    """The files a model is: the file itself, or a folder's files in name order."""
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def fingerprint(path: Path) -> Fingerprint:
    """sha256 and size of a model file (for a folder, of its files: name + content, in name order), and
    an .apr file's footer check, from one read or from the cache."""
    files = model_files(path)
    store = cache_file()
    if store is None:
        return _hash(path, files)
    started = time.time_ns()
    where, before = str(path.resolve()), _keys(path, files)
    entries = _load(store)
    hit = entries.get(where)
    if hit is not None and hit["files"] == before:
        if next(reversed(entries)) != where:
            _save(store, entries, where, hit)  # marks it the most recently used
        footer = hit["footer"]
        return Fingerprint(hit["sha256"], hit["bytes"], None if footer is None else FooterCheck(*footer))
    got = _hash(path, files)
    settled = all(started - key[-1] >= RACY_NS for key in before)
    if settled and _keys(path, files) == before:
        f = got.footer
        footer = None if f is None else [f.stored, f.computed, f.covered]
        _save(
            store,
            entries,
            where,
            {"files": before, "sha256": got.sha256, "bytes": got.bytes, "footer": footer},
        )
    return got


def intact(path: Path) -> Fingerprint:
    """`fingerprint(path)` of a model whose whole-file checksum holds; FormatError when it does not."""
    got = fingerprint(path)
    got.check(path)
    return got


def check_intact(path: Path) -> None:
    """Raise FormatError when `path` is an .apr file whose footer CRC fails, from the cache or from one read
    that fills it (a later trace of the file reads nothing more). Other models keep no whole-file checksum:
    nothing is read."""
    if path.is_file() and _is_apr(path):
        intact(path)


def _is_apr(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(APR_MAGIC)) == APR_MAGIC
    except OSError:
        return False  # opening the model says why, in its own words


def _hash(path: Path, files: list[Path]) -> Fingerprint:
    h, total, folder = hashlib.sha256(), 0, path.is_dir()
    crc: FooterCrc | None = None
    for f in files:
        if folder:
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            chunk = fh.read(HASH_CHUNK)
            if not folder and chunk.startswith(APR_MAGIC):  # the magic alone: a bad header still counts
                crc = FooterCrc()
            while chunk:
                h.update(chunk)
                if crc is not None:
                    crc.update(chunk)
                total += len(chunk)
                chunk = fh.read(HASH_CHUNK)
    return Fingerprint(h.hexdigest(), total, None if crc is None else crc.result())


def _keys(path: Path, files: list[Path]) -> list[FileKey]:
    out: list[FileKey] = []
    folder = path.is_dir()
    for f in files:
        st = f.stat()
        rel = f.relative_to(path).as_posix() if folder else ""
        out.append([rel, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    return out


def _load(store: Path) -> dict[str, dict[str, Any]]:
    """The cached entries (path → entry), in least- to most-recently-used order; {} for anything else."""
    try:  # a regular file only: a FIFO planted there would hang the open
        data = json.loads(read_regular(store, MAX_CACHE_BYTES) or b"null")
    except (AprError, ValueError, RecursionError):  # RecursionError: JSON nested past Python's stack
        return {}
    if not isinstance(data, dict) or data.get("schema") != CACHE_SCHEMA:
        return {}
    entries = data.get("entries")
    if not isinstance(entries, dict):
        return {}
    return {k: v for k, v in entries.items() if isinstance(k, str) and _valid(v)}


def _valid(entry: Any) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("files"), list):
        return False
    sha, size = entry.get("sha256"), entry.get("bytes")
    if not (isinstance(sha, str) and len(sha) == 64 and isinstance(size, int) and size >= 0):
        return False
    if not _valid_footer(entry.get("footer", False), size):
        return False
    return all(
        isinstance(k, list) and len(k) == 6 and isinstance(k[0], str) and all(type(v) is int for v in k[1:])
        for k in entry["files"]
    )


def _valid_footer(footer: Any, size: int) -> bool:
    """None (no checksum), or [stored, computed, covered] as `FooterCheck` holds them."""
    if footer is None:
        return True
    if not (isinstance(footer, list) and len(footer) == 3 and all(type(v) is int for v in footer)):
        return False
    stored, computed, covered = (int(v) for v in footer)
    return 0 <= stored < CRC_MAX and 0 <= computed < CRC_MAX and 0 <= covered <= size


def _save(store: Path, entries: dict[str, dict[str, Any]], where: str, entry: dict[str, Any]) -> None:
    entries.pop(where, None)
    entries[where] = entry  # last: the most recently used
    kept = dict(list(entries.items())[-MAX_ENTRIES:])
    data = json.dumps({"schema": CACHE_SCHEMA, "entries": kept}, separators=(",", ":")).encode()
    with contextlib.suppress(AprError):  # a read-only or full cache directory: no caching
        write_bytes_atomic(store, data)
