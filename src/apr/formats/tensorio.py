"""Reading one tensor (or some of its rows) out of a file region, shared by every format.

Each read maps only that tensor's bytes (`np.memmap` with an offset) and the mapping dies with the returned
array's last reference, so a trace over a multi-GB file keeps just the tensor in use resident. Rows of a 2-D
tensor are whole quant blocks (its row length is a multiple of the block size), so selected rows are read and
dequantized without touching the others.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from apr.errors import AprIOError, FormatError
from apr.formats.base import F32Array, TensorInfo
from apr.quant import dequantize


def tensor_bytes(path: Path, info: TensorInfo) -> npt.NDArray[np.uint8]:
    """The tensor's stored bytes, memory-mapped read-only."""
    if info.nbytes == 0:
        return np.zeros(0, np.uint8)
    try:
        return np.memmap(path, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.nbytes,))
    except (OSError, ValueError) as e:
        raise AprIOError(f"{path}: cannot map tensor {info.name}: {e}") from None


def read_tensor(path: Path, info: TensorInfo) -> F32Array:
    return dequantize(tensor_bytes(path, info), info.qtype, info.shape)


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
