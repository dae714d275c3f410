"""ggml's own C quantizer, called through ctypes from llama-cpp-python's libggml-base (the oracle side).

`ggml_quantize(values, qtype)` runs `ggml_quantize_chunk(type, src, dst, 0, nrows, n_per_row, NULL)`:
without an importance matrix that is exactly `quantize_row_*_ref`, the code apr.quant.quantize follows.
`available()` is False when llama-cpp-python is not installed; tests that need it skip.
"""

from __future__ import annotations

import ctypes
import importlib.util
from functools import cache
from pathlib import Path

import numpy as np
import numpy.typing as npt

from apr.quant.types import QUANT_LAYOUT, QuantType


@cache
def _lib() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "lib" / "libggml-base.so"
    if not path.is_file():
        return None
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,  # enum ggml_type
        ctypes.c_void_p,  # const float * src
        ctypes.c_void_p,  # void * dst
        ctypes.c_int64,  # start
        ctypes.c_int64,  # nrows
        ctypes.c_int64,  # n_per_row
        ctypes.c_void_p,  # const float * imatrix
    ]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    return lib


def available() -> bool:
    return _lib() is not None


def ggml_quantize(values: npt.NDArray[np.float32], qtype: QuantType) -> npt.NDArray[np.uint8]:
    """`values` (rows, n_per_row) quantized by ggml: uint8 (rows, bytes per row)."""
    lib = _lib()
    assert lib is not None, "llama-cpp-python is not installed"
    assert not lib.ggml_quantize_requires_imatrix(int(qtype))
    x = np.ascontiguousarray(values, dtype=np.float32)
    rows, n_per_row = x.shape
    layout = QUANT_LAYOUT[qtype]
    out = np.zeros((rows, n_per_row // layout.block_size * layout.type_size), np.uint8)
    written = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, n_per_row, None)
    assert written == out.nbytes, (written, out.nbytes)
    return out
