"""IQ grid dequantizers: IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S (ggml-common.h blocks).

An IQ block stores, per group of 8 weights (IQ3: 4), an index into a grid of vectors (grids.py) and the
group's sign bits, and per 16 or 32 weights a small integer scale. ggml computes a weight as
`db * grid[j] * (±1)`, IQ1 as `dl * (grid[j] + delta)`, with the float32 `db`/`dl` made from the block's
f16 `d` and the scale. A sign flip is exact and commutes with float32 rounding, and `grid[j] + delta`
is exact, so every type gets a *table* of the exact signed vectors (float32), one row per possible
(grid index, signs) of a group. A kernel computes the row of every group in int64, gathers the rows
straight into the output (`gather`), and multiplies by `db` computed as ggml does (`scale_groups`):
the result is bit-identical to `dequantize_row_iq*` and gguf-py, NaN and ±0 included.

Each table is built on first use (128 KiB to 2 MiB) and cached. Row layouts, per type:

    IQ2_XXS  g·128 + s            g 8-bit grid index, s 7-bit sign index (`KSIGNS`), 8 weights a row
    IQ2_XS   s·512 + g            = the stored u16 itself (g 9 bits, s 7 bits)
    IQ2_S    (g·2 + half)·16 + n  g 10 bits, half of the 8-vector, n its 4 raw sign bits (4 weights)
    IQ3_XXS  g·256 + s·2 + half   s 7-bit sign index, half: which 4 of its 8 signs (4 weights)
    IQ3_S    g·16 + n             g 9 bits, n 4 raw sign bits (4 weights)
    IQ1_*    m·2048 + g           g 11 bits, m the delta's sign bit (delta = -1/8 if set, else +1/8)
"""

from __future__ import annotations

from functools import cache
from typing import Final

import numpy as np
import numpy.typing as npt

from apr.quant.blocks import F32Array, U8Array, block_kernel, f16_at, gather, readonly, scale_groups
from apr.quant.grids import (
    IQ1S_GRID,
    IQ2S_GRID,
    IQ2XS_GRID,
    IQ2XXS_GRID,
    IQ3S_GRID,
    IQ3XXS_GRID,
    KSIGNS,
    Grid,
    sign_patterns,
)
from apr.quant.types import QuantType

IQ1S_DELTA: Final = np.float32(0.125)
_SHIFTS_7: Final = np.array([0, 7, 14, 21], np.uint32)  # four 7-bit sign indices in a u32
_SHIFTS_3: Final = np.array([0, 3, 6, 9], np.uint16)  # four 3-bit fields in a u16
_SHIFTS_2: Final = np.array([0, 2, 4, 6], np.uint8)  # four 2-bit fields in a byte
_SHIFTS_NIBBLE: Final = np.array([0, 4], np.uint8)
_D_SHIFTS: Final = np.array([0, 4, 8, 12], np.uint16)  # IQ1_M: where each u16's top nibble goes in d
_HALVES: Final = np.array([0, 1], np.intp)


# --- tables -----------------------------------------------------------------------------------------


def _outer(a: F32Array, b: F32Array) -> F32Array:
    """Rows `a[i] * b[j]` at row i·len(b) + j: (len(a)·len(b), width), read-only."""
    return readonly((a[:, None, :] * b[None, :, :]).reshape(-1, a.shape[1]))


def _halves(vectors: F32Array) -> F32Array:
    """(n, 8) → (2n, 4): row 2i + h is the h-th half of vector i."""
    return np.ascontiguousarray(vectors.reshape(-1, 4))


def _grid(grid: Grid) -> F32Array:
    return grid.vectors().astype(np.float32)


@cache
def iq2xxs_table() -> F32Array:
    return _outer(_grid(IQ2XXS_GRID), sign_patterns(8)[KSIGNS])


@cache
def iq2xs_table() -> F32Array:
    return _outer(sign_patterns(8)[KSIGNS], _grid(IQ2XS_GRID))


@cache
def iq2s_table() -> F32Array:
    return _outer(_halves(_grid(IQ2S_GRID)), sign_patterns(4))


@cache
def iq3xxs_table() -> F32Array:
    return _outer(_grid(IQ3XXS_GRID), _halves(sign_patterns(8)[KSIGNS]))


@cache
def iq3s_table() -> F32Array:
    return _outer(_grid(IQ3S_GRID), sign_patterns(4))


@cache
def iq1_table() -> F32Array:
    deltas = np.array([[IQ1S_DELTA], [-IQ1S_DELTA]], np.float32)  # (2, 1)
    return readonly((deltas[:, None, :] + _grid(IQ1S_GRID)[None, :, :]).reshape(-1, 8))


# --- shared pieces ------------------------------------------------------------------------------------


def _u16(x: U8Array) -> npt.NDArray[np.uint16]:
    return np.ascontiguousarray(x).view("<u2").astype(np.uint16, copy=False)


def _u32(x: U8Array) -> npt.NDArray[np.uint32]:
    return np.ascontiguousarray(x).view("<u4").astype(np.uint32, copy=False)


def _nibbles(x: U8Array) -> U8Array:
    """(n, k) bytes → (n, 2k): the low then the high nibble of each byte."""
    return ((x[:, :, None] >> _SHIFTS_NIBBLE) & np.uint8(0x0F)).reshape(len(x), -1)


def _half_plus(d: F32Array, ls: npt.NDArray[np.unsignedinteger], k: float) -> F32Array:
    """`d * (0.5f + ls) * k` (IQ2: k = 1/4, IQ3_XXS: 1/2), in ggml's order."""
    return (d * (np.float32(0.5) + ls.astype(np.float32))) * np.float32(k)


def _odd(d: F32Array, ls: npt.NDArray[np.unsignedinteger]) -> F32Array:
    """`d * (2·ls + 1)` (IQ1, IQ3_S)."""
    return d * (2 * ls.astype(np.float32) + np.float32(1.0))


# --- kernels ------------------------------------------------------------------------------------------


@block_kernel(QuantType.IQ2_XXS)
def _iq2_xxs(b: U8Array, out: F32Array) -> None:  # d; per 32: 4 grid bytes, u32 (4×7 sign bits, scale)
    n = len(b)
    qs = b[:, 2:].reshape(n, 8, 8)
    aux = _u32(qs[:, :, 4:]).reshape(n, 8)
    index = qs[:, :, :4].astype(np.intp)  # (n, 8, 4)
    index <<= 7
    index |= (aux[:, :, None] >> _SHIFTS_7) & np.uint32(0x7F)
    gather(iq2xxs_table(), index, out)
    scale_groups(out, _half_plus(f16_at(b, 0), aux >> np.uint32(28), 0.25))


@block_kernel(QuantType.IQ2_XS)
def _iq2_xs(b: U8Array, out: F32Array) -> None:  # d, qs: u16[32] (grid | signs << 9), scales[8]
    gather(iq2xs_table(), _u16(b[:, 2:66]).astype(np.intp), out)
    scale_groups(out, _half_plus(f16_at(b, 0), _nibbles(b[:, 66:74]), 0.25))


@block_kernel(QuantType.IQ2_S)
def _iq2_s(b: U8Array, out: F32Array) -> None:  # d, qs[32], signs[32], qh[8] (2 bits a group), sc[8]
    n = len(b)
    grid = ((b[:, 66:74, None] >> _SHIFTS_2) & np.uint8(3)).reshape(n, 32).astype(np.intp)
    grid <<= 8
    grid |= b[:, 2:34]
    grid <<= 5  # (g·2 + half)·16
    index = _nibbles(b[:, 34:66]).reshape(n, 32, 2) | grid[:, :, None]
    index |= _HALVES << 4
    gather(iq2s_table(), index, out)
    scale_groups(out, _half_plus(f16_at(b, 0), _nibbles(b[:, 74:82]), 0.25))


@block_kernel(QuantType.IQ3_XXS)
def _iq3_xxs(b: U8Array, out: F32Array) -> None:  # d, qs[64] grid bytes, u32[8] (4×7 sign bits, scale)
    n = len(b)
    aux = _u32(b[:, 66:98])  # (n, 8)
    signs = ((aux[:, :, None] >> _SHIFTS_7) & np.uint32(0x7F)).astype(np.intp)  # (n, 8, 4)
    signs <<= 1
    index = b[:, 2:66].reshape(n, 8, 4, 2).astype(np.intp)
    index <<= 8
    index |= signs[:, :, :, None]
    index |= _HALVES
    gather(iq3xxs_table(), index, out)
    scale_groups(out, _half_plus(f16_at(b, 0), aux >> np.uint32(28), 0.5))


@block_kernel(QuantType.IQ3_S)
def _iq3_s(b: U8Array, out: F32Array) -> None:  # d, qs[64], qh[8] (bit 8 of each), signs[32], sc[4]
    index = np.unpackbits(b[:, 66:74], axis=1, bitorder="little").astype(np.intp)  # (n, 64)
    index <<= 8
    index |= b[:, 2:66]
    index <<= 4
    index |= _nibbles(b[:, 74:106])
    gather(iq3s_table(), index, out)
    scale_groups(out, _odd(f16_at(b, 0), _nibbles(b[:, 106:110])))


@block_kernel(QuantType.IQ1_S)
def _iq1_s(b: U8Array, out: F32Array) -> None:  # d, qs[32], qh: u16[8] (4×3 grid bits, scale, delta)
    n = len(b)
    qh = _u16(b[:, 34:50])  # (n, 8)
    high = (qh[:, :, None] >> _SHIFTS_3) & np.uint16(7)  # (n, 8, 4): bits 8..10 of each grid index
    high |= (qh[:, :, None] >> np.uint16(15)) << np.uint16(3)  # the delta's sign: bit 11 of the row
    index = high.astype(np.intp) << 8
    index |= b[:, 2:34].reshape(n, 8, 4)
    gather(iq1_table(), index, out)
    scale_groups(out, _odd(f16_at(b, 0), (qh >> np.uint16(12)) & np.uint16(7)))


@block_kernel(QuantType.IQ1_M)
def _iq1_m(b: U8Array, out: F32Array) -> None:  # qs[32], qh[16] (nibble: 3 grid bits, delta), sc[4]
    n = len(b)
    sc = _u16(b[:, 48:56])  # (n, 4): 4×3 bits of sub-scales each, and one nibble of the f16 d
    d_bits = np.bitwise_or.reduce((sc >> np.uint16(12)) << _D_SHIFTS, axis=1)
    d = d_bits.reshape(n, 1).view("<f2").astype(np.float32)
    index = _nibbles(b[:, 32:48]).astype(np.intp) << 8  # (n, 32); the delta's sign lands on bit 11
    index |= b[:, :32]
    gather(iq1_table(), index, out)
    scales = (sc[:, :, None] >> _SHIFTS_3) & np.uint16(7)
    scale_groups(out, _odd(d, scales.reshape(n, 16)))
