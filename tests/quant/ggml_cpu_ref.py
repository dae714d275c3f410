"""ggml-cpu's own matmul pieces through ctypes (libggml-cpu of llama-cpp-python, the build llama.cpp runs):
the activation quantizers `quantize_row_q8_0/q8_1/q8_K` and the dot kernels `ggml_vec_dot_<w>_<q8>` —
the SIMD variants this x86 build dispatches to, the oracle for apr.quant.vecdot.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import numpy as np
import numpy.typing as npt

from apr.quant.types import GGML_LAYOUT, QuantType

ACTIVATION_TYPES = (QuantType.Q8_0, QuantType.Q8_1, QuantType.Q8_K)


@cache
def _lib() -> ctypes.CDLL:
    import llama_cpp

    base = Path(llama_cpp.__file__).parent / "lib"
    ctypes.CDLL(str(base / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(str(base / "libggml-cpu.so"))
    lib.ggml_cpu_init()  # the f16 tables the kernels read
    return lib


def _type_name(qtype: QuantType) -> str:
    return qtype.name.lower().replace("_k", "_K")


def quantize_row(x: npt.NDArray[np.float32], qtype: QuantType) -> npt.NDArray[np.uint8]:
    """ggml-cpu's `quantize_row_<qtype>` of each row of x (T, n): (T, row bytes)."""
    fn = getattr(_lib(), f"quantize_row_{_type_name(qtype)}")
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    x = np.ascontiguousarray(x, np.float32)
    lay = GGML_LAYOUT[qtype]
    out = np.zeros((x.shape[0], x.shape[1] // lay.block_size * lay.type_size), np.uint8)
    for row, dst in zip(x, out, strict=True):
        fn(row.ctypes.data, dst.ctypes.data, row.size)
    return out


def vec_dot(
    wtype: QuantType, vdt: QuantType, w_raw: npt.NDArray[np.uint8], x_raw: npt.NDArray[np.uint8], n: int
) -> npt.NDArray[np.float32]:
    """ggml_vec_dot_<wtype>_<vdt>(weight row r, activation row t) for every pair: (T, rows) float32."""
    fn = getattr(_lib(), f"ggml_vec_dot_{_type_name(wtype)}_{_type_name(vdt)}")
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t]
    fn.argtypes += [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = None
    w = np.ascontiguousarray(w_raw, np.uint8)
    x = np.ascontiguousarray(x_raw, np.uint8)
    out = np.zeros((x.shape[0], w.shape[0]), np.float32)
    s = np.zeros(1, np.float32)
    for t in range(x.shape[0]):
        for r in range(w.shape[0]):
            fn(n, s.ctypes.data, 0, w[r].ctypes.data, 0, x[t].ctypes.data, 0, 1)
            out[t, r] = s[0]
    return out
