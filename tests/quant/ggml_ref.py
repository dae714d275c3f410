"""ggml's own C (de)quantizers, called through ctypes from llama-cpp-python's libggml-base (the oracle side).

`ggml_quantize(values, qtype)` runs `ggml_quantize_chunk(type, src, dst, 0, nrows, n_per_row, imatrix)`:
without an importance matrix that is exactly `quantize_row_*_ref`, the code apr.quant.quantize follows;
the IQ types llama.cpp will not make without one (`requires_imatrix`) need `imatrix`, one weight per
column. `ggml_dequantize(raw, qtype)` runs ggml's `dequantize_row_<type>`. `available()` is False when
llama-cpp-python is not installed; tests that need it skip.
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
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.ggml_blck_size.restype = ctypes.c_int64
    return lib


def available() -> bool:
    return _lib() is not None


def _the_lib() -> ctypes.CDLL:
    lib = _lib()
    assert lib is not None, "llama-cpp-python is not installed"
    return lib


def requires_imatrix(qtype: QuantType) -> bool:
    return bool(_the_lib().ggml_quantize_requires_imatrix(int(qtype)))


def knows(qtype: QuantType) -> bool:
    """This libggml has `qtype` as a block type with a `dequantize_row_*` (not a removed id)."""
    lib = _the_lib()
    if qtype >= 128 or lib.ggml_blck_size(int(qtype)) <= 1:
        return False
    return hasattr(lib, _dequantize_symbol(qtype))


def _dequantize_symbol(qtype: QuantType) -> str:
    name = _the_lib().ggml_type_name(int(qtype))
    return f"dequantize_row_{name.decode()}"


def ggml_quantize(
    values: npt.NDArray[np.float32], qtype: QuantType, imatrix: npt.NDArray[np.float32] | None = None
) -> npt.NDArray[np.uint8]:
    """`values` (rows, n_per_row) quantized by ggml: uint8 (rows, bytes per row)."""
    lib = _the_lib()
    assert imatrix is not None or not requires_imatrix(qtype), f"{qtype.name} needs an importance matrix"
    x = np.ascontiguousarray(values, dtype=np.float32)
    rows, n_per_row = x.shape
    weights = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    assert weights is None or weights.shape == (n_per_row,)
    layout = QUANT_LAYOUT[qtype]
    out = np.zeros((rows, n_per_row // layout.block_size * layout.type_size), np.uint8)
    w_ptr = None if weights is None else weights.ctypes.data
    written = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, n_per_row, w_ptr)
    assert written == out.nbytes, (written, out.nbytes)
    return out


def ggml_dequantize(raw: npt.NDArray[np.uint8], qtype: QuantType) -> npt.NDArray[np.float32]:
    """ggml's `dequantize_row_*` of whole blocks `raw`: flat float32."""
    fn = getattr(_the_lib(), _dequantize_symbol(qtype))
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn.restype = None
    data = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    layout = QUANT_LAYOUT[qtype]
    assert data.size % layout.type_size == 0
    out = np.empty(data.size // layout.type_size * layout.block_size, np.float32)
    fn(data.ctypes.data, out.ctypes.data, out.size)
    return out
