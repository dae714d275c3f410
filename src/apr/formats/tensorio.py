"""Reading a tensor's bytes (all, a byte range, or some rows) out of a model file, shared by every format.

Every read is a pread from a descriptor the checkpoint holds open from `open` to `close`, into a private
buffer; nothing of a model file is ever memory-mapped past opening. That is what makes a model file that
shrinks during a run (truncated in place, or rewritten by a download or a conversion) a clean error: a
pread past the new end returns short and becomes a `FormatError` naming the tensor and both offsets, where a
touch of a mapping past a file's end is SIGBUS and kills the process. A file *replaced* by a rename keeps
being read from the inode that was opened, so a run never mixes two files. (A file rewritten in place with
the same size is read as it is now: nothing short of hashing every read could see that.)

Reads stay lazy and small: the engine asks for one row block of a matrix at a time (`read_range`), the
embedding lookup for the prompt's rows only (`read_rows`), so a trace keeps only the block in use resident.
Rows of a 2-D tensor are whole quant blocks (its row length is a multiple of the block size), so selected
rows are read and dequantized without touching the others.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import numpy.typing as npt

from apr.errors import AprIOError, FormatError, NotFoundError, ValidationError
from apr.formats.base import TensorInfo
from apr.formats.files import kind, regular

U8Array = npt.NDArray[np.uint8]


class TensorFile:
    """A model file held open (read-only) for the life of a checkpoint."""

    fd: int | None

    def __init__(self, path: Path) -> None:
        self.path, self.fd = path, None
        regular(path)  # a FIFO would block open(), a device would be read without end
        try:  # O_NONBLOCK: a FIFO swapped in after the stat must not hang the open (no-op for files)
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise NotFoundError(f"File not found: {path}") from None
        except OSError as e:
            raise AprIOError(f"cannot open {path}: {e.strerror or e}") from None
        if (what := kind(os.fstat(self.fd))) is not None:
            self.close()
            raise FormatError(f"{path}: is {what}, not a regular file")

    def size(self) -> int:
        return os.fstat(self.fileno()).st_size

    def fileno(self) -> int:
        if self.fd is None:
            raise AprIOError(f"{self.path}: the checkpoint is closed")
        return self.fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:  # a checkpoint dropped without close() does not leak its descriptor
        self.close()


def pread_into(fd: int, buf: U8Array, offset: int, what: str) -> None:
    """Fill `buf` from the file's bytes at `offset`; a file that ends first is a FormatError."""
    view, done, n = buf.reshape(-1).data, 0, buf.nbytes  # buf is contiguous: a view
    while done < n:  # a single pread returns at most ~2 GiB
        try:
            got = os.preadv(fd, [view[done:]], offset + done)
        except OSError as e:
            raise AprIOError(f"{what}: cannot read at offset {offset + done}: {e.strerror or e}") from None
        if got <= 0:
            raise FormatError(
                f"{what}: needs bytes {offset}..{offset + n}, but the file now has {_size(fd)} bytes "
                "(truncated after apr opened it?)"
            )
        done += got


def _size(fd: int) -> int | str:
    try:
        return os.fstat(fd).st_size
    except OSError:
        return "fewer"


def read_range(fd: int, info: TensorInfo, start: int, stop: int, where: str) -> U8Array:
    """Bytes [start, stop) of the tensor's stored bytes, as a private copy."""
    if not 0 <= start <= stop <= info.nbytes:
        raise ValidationError(
            f"{where}: tensor '{info.name}': bytes [{start}, {stop}) are outside its {info.nbytes} bytes"
        )
    buf = np.empty(stop - start, np.uint8)
    pread_into(fd, buf, info.offset + start, f"{where}: tensor '{info.name}'")
    return buf


def read_exact(fd: int, info: TensorInfo, where: str) -> U8Array:
    """All of the tensor's stored bytes, as a private copy."""
    return read_range(fd, info, 0, info.nbytes, where)


Rows = npt.NDArray[np.int64] | range


def read_rows(fd: int, info: TensorInfo, first: int, row_bytes: int, rows: Rows, where: str) -> U8Array:
    """(len(rows), row_bytes): the stored bytes of the given rows, row r at byte first + r·row_bytes of the
    tensor's bytes. Runs of consecutive rows are read with one pread each; repeated rows are read once."""
    if not len(rows) or not row_bytes:
        return np.empty((len(rows), row_bytes), np.uint8)  # no bytes (even for 2^60 empty rows)
    index = np.arange(rows.start, rows.stop, rows.step) if isinstance(rows, range) else rows
    wanted, inverse = np.unique(index, return_inverse=True)
    if wanted[0] < 0 or first + (int(wanted[-1]) + 1) * row_bytes > info.nbytes:
        raise ValidationError(f"{where}: tensor '{info.name}': row index outside its rows")
    got = np.empty((len(wanted), row_bytes), np.uint8)
    breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
    what = f"{where}: tensor '{info.name}'"
    for lo, hi in zip((0, *breaks.tolist()), (*breaks.tolist(), len(wanted)), strict=True):
        pread_into(fd, got[lo:hi], info.offset + first + int(wanted[lo]) * row_bytes, what)
    if len(wanted) == len(index) and (wanted == index).all():
        return got  # rows in order, each once (a slice, a row block)
    return got[inverse.reshape(-1)]


def row_index(rows: npt.NDArray[np.int64] | slice, n_rows: int, what: str) -> Rows:
    """A slice (as a range: nothing allocated) or an integer array of rows, negative ones counting from the
    end, as row numbers in range."""
    if isinstance(rows, slice):
        return range(n_rows)[rows]
    index = np.asarray(rows)
    if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
        raise ValidationError(
            f"{what}: rows must be a slice or a 1-D integer array, got {index.dtype}{list(index.shape)}"
        )
    bad = index[(index < -n_rows) | (index >= n_rows)]
    if bad.size:
        raise ValidationError(f"{what}: row {int(bad[0])} is out of range for {n_rows} rows")
    return np.where(index < 0, index + n_rows, index).astype(np.int64, copy=False)
