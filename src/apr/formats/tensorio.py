"""Reading one tensor (or some of its rows) out of a file region, shared by every format.

Whole tensors are read with pread into private buffers (`read_exact`, used by the GGUF, .apr and safetensors
readers); `tensor_bytes` maps only one tensor's bytes and the mapping dies with the returned array's last
reference, so a trace over a multi-GB file keeps just the tensor in use resident. Rows of a 2-D tensor are
whole quant blocks (its row length is a multiple of the block size), so selected rows are read and
dequantized without touching the others.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import numpy.typing as npt

from apr.errors import AprIOError, FormatError
from apr.formats.base import F32Array, TensorInfo
from apr.quant import dequantize


def read_exact(fd: int, info: TensorInfo, where: str) -> npt.NDArray[np.uint8]:
    """A private copy of the tensor's stored bytes, read with pread (nothing stays mapped)."""
    buf = np.empty(info.nbytes, np.uint8)
    view, done = buf.data, 0
    while done < info.nbytes:  # a single pread returns at most ~2 GiB
        n = os.preadv(fd, [view[done:]], info.offset + done)
        if n <= 0:
            raise FormatError(
                f"{where}: tensor '{info.name}': file ends at offset {info.offset + done}, "
                f"expected {info.nbytes} bytes from {info.offset} (truncated after opening?)"
            )
        done += n
    return buf


def check_extent(size: int, info: TensorInfo, where: str) -> None:
    """Refuse to map a tensor the file (as it is now) does not hold: touching a mapping past the end of a
    file that shrank after opening is SIGBUS, not an exception."""
    if info.offset + info.nbytes > size:
        raise FormatError(
            f"{where}: tensor '{info.name}': needs bytes {info.offset}..{info.offset + info.nbytes}, "
            f"the file now has {size} (truncated after opening?)"
        )


def tensor_bytes(path: Path, info: TensorInfo) -> npt.NDArray[np.uint8]:
    """The tensor's stored bytes, memory-mapped read-only."""
    if info.nbytes == 0:
        return np.zeros(0, np.uint8)
    try:
        check_extent(path.stat().st_size, info, str(path))
        return np.memmap(path, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.nbytes,))
    except (OSError, ValueError) as e:
        raise AprIOError(f"{path}: cannot map tensor {info.name}: {e}") from None


def read_tensor(path: Path, info: TensorInfo) -> F32Array:
    """The whole tensor as a private float32 array (read, not mapped: nothing of the file stays resident)."""
    try:
        with path.open("rb") as f:
            raw = read_exact(f.fileno(), info, str(path))
    except OSError as e:
        raise AprIOError(f"{path}: cannot read tensor {info.name}: {e.strerror or e}") from None
    return dequantize(raw, info.qtype, info.shape)


def read_tensor_rows(path: Path, info: TensorInfo, rows: npt.NDArray[np.int64] | slice) -> F32Array:
    """Rows of a 2-D tensor (first axis), reading only their bytes."""
    if len(info.shape) != 2:
        raise FormatError(f"{path}: tensor {info.name} has shape {list(info.shape)}; row reads need 2-D")
    n_rows, n_cols = info.shape
    row_bytes = info.nbytes // n_rows if n_rows else 0
    raw = tensor_bytes(path, info).reshape(n_rows, row_bytes)
    if isinstance(rows, slice):
        picked = raw[rows]
    else:
        idx = np.asarray(rows, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n_rows):
            raise FormatError(f"{path}: tensor {info.name}: row index outside 0..{n_rows - 1}")
        picked = raw[idx]
    return dequantize(np.ascontiguousarray(picked).reshape(-1), info.qtype, (picked.shape[0], n_cols))
