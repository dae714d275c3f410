"""Tensor element types → float32 and back: `dequantize`, `quantize`, and the types each supports.

    x = np.linspace(-1, 1, 512, dtype=np.float32).reshape(2, 256)
    raw = quantize(x, QuantType.Q6_K)              # (2, 210) uint8: one super-block per row
    y = dequantize(raw, QuantType.Q6_K, (2, 256))  # float32 (2, 256), |y - x| < 0.014

`dequantize` is bit-identical to ggml's `dequantize_row_*` (and gguf-py's `dequantize`) for every GGML
type it supports — every type gguf-py can dequantize; `quantize` is byte-identical to ggml's reference
quantizers (`quantize_row_*_ref`) on finite input. The per-type code lives in `blocks.py` (plain
types, 32-element blocks, apr's own), `kquants.py` (K-quants), `iquants.py` (the IQ grid types, data in
`grids.py`), `codebooks.py` (IQ4_NL, IQ4_XS, MXFP4, NVFP4), `ternary.py` (TQ1_0, TQ2_0) and
`quantize.py`; each registers itself under its `QuantType`, and the functions here are dict lookups
plus argument checks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Final

import numpy as np
import numpy.typing as npt

from apr.errors import FormatError, UnsupportedQuantError
from apr.quant import codebooks as _codebooks  # noqa: F401  (each of these registers its dequantizers)
from apr.quant import iquants as _iquants  # noqa: F401
from apr.quant import kquants as _kquants  # noqa: F401
from apr.quant import ternary as _ternary  # noqa: F401
from apr.quant.blocks import DEQUANTIZERS, Dequantizer
from apr.quant.quantize import QUANTIZERS
from apr.quant.quantize import quantize as quantize
from apr.quant.types import QuantType

__all__ = [
    "DEQUANT_TYPES",
    "QUANT_TYPES",
    "QuantType",
    "dequant_threads",
    "dequantize",
    "parallel_dequant",
    "quantize",
    "row_nbytes",
]

DEQUANT_TYPES: Final[frozenset[QuantType]] = frozenset(DEQUANTIZERS)
QUANT_TYPES: Final[frozenset[QuantType]] = frozenset(QUANTIZERS)


def dequantize(
    raw: npt.NDArray[np.uint8], qtype: QuantType, shape: tuple[int, ...], threads: int | None = None
) -> npt.NDArray[np.float32]:
    """The float32 array of `shape` stored as `raw` (whole rows, row-major) in `qtype`.

    A block type's blocks are shared among `threads` threads (default: `dequant_threads()`, 1 unless a
    `with parallel_dequant(k):` block says otherwise); tensors under ~2**19 elements a thread take fewer.
    The bits never depend on the thread count. For F32 the result is a view of `raw` (zero-copy;
    read-only if `raw` is). Raises UnsupportedQuantError for a type without a dequantizer and
    FormatError when `raw` does not hold exactly the bytes of `shape` or a row is not a whole number of
    blocks.
    """
    codec = _dequantizer(qtype)
    n = math.prod(shape)
    cols = shape[-1] if shape else 1
    if cols % codec.row_multiple:
        raise FormatError(
            f"{qtype.name} rows of {cols} elements are not a whole number of "
            f"{codec.row_multiple}-element blocks"
        )
    flat = np.asarray(raw).reshape(-1).view(np.uint8)
    expected = codec.nbytes(n)
    if flat.size != expected:
        raise FormatError(
            f"{qtype.name} tensor of shape {list(shape)} needs {expected} bytes, got {flat.size}"
        )
    return codec.decode(flat, n, dequant_threads() if threads is None else max(1, threads)).reshape(shape)


_THREADS: Final[ContextVar[int]] = ContextVar("apr_dequant_threads", default=1)


def dequant_threads() -> int:
    """The thread count `dequantize` uses when not told: 1, or what the enclosing `parallel_dequant` set.
    (A context variable: threads started elsewhere — the engine's own pool — see 1, so the two never
    multiply.)"""
    return _THREADS.get()


@contextmanager
def parallel_dequant(threads: int) -> Iterator[None]:
    """Within the block, `dequantize` shares each large tensor among `threads` threads (whole-tensor
    reads: import, export, convert; the engine dequantizes row blocks on its own threads instead)."""
    token = _THREADS.set(max(1, threads))
    try:
        yield
    finally:
        _THREADS.reset(token)


def row_nbytes(qtype: QuantType, cols: int) -> int | None:
    """Stored bytes of one row of `cols` elements, when a 2-D tensor of `qtype` stores its rows whole and
    back to back (so row r is bytes [r·n, (r+1)·n)); None when it does not (a partial block, blocks or a
    header running across rows) or `qtype` has no dequantizer."""
    codec = DEQUANTIZERS.get(qtype)
    if codec is None or cols <= 0 or cols % codec.row_multiple:
        return None
    try:
        one = codec.nbytes(cols)
        return one if codec.nbytes(2 * cols) == 2 * one else None
    except ValueError:  # cols is not a whole number of the type's blocks
        return None


def _dequantizer(qtype: QuantType) -> Dequantizer:
    codec = DEQUANTIZERS.get(qtype)
    if codec is None:
        raise UnsupportedQuantError(f"no dequantizer for {qtype.name} ({int(qtype)})")
    return codec
