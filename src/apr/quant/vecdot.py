"""ggml-cpu's matmul arithmetic, emulated: which type each weight type's activations are quantized to, the
activation quantizers, and the block dot product, so `x @ Wᵀ` comes out as llama.cpp computes it.

ggml-cpu multiplies a weight of type t by an activation row after converting the row with
`type_traits_cpu[vec_dot_type(t)].from_float` (ggml-cpu.c): Q8_0 blocks of 32 for Q4_0/Q5_0/Q8_0/IQ4_NL/
MXFP4/NVFP4, Q8_1 (Q8_0 plus s = f16(d·Σq)) for Q4_1/Q5_1, Q8_K super-blocks of 256 (f32 d, int16 bsums)
for the K, IQ and ternary types, f16 for F16 and bf16 for BF16 weights; F32 stays F32 (`VEC_DOT_TYPE`).
The quantizers below are the ones this x86 build runs (AVX2 `quantize_row_q8_0/q8_1`, `q8_K` = the
reference): d = amax/127, id = 127/amax and round-half-even, where the generic C has id = 1/d and roundf
(half away from zero) — the two differ on ties and when 127/amax ≠ 1/(amax/127) in f32, i.e. rarely.

Every `ggml_vec_dot_<t>_<q8>` kernel (generic C, AVX2, llamafile's tinyBLAS and the repacked 8×8 kernels
alike) computes, per block, an exact integer Σ q_w·q_x (times integer sub-block scales) and then scales it
in f32: `(d_w·d_x)·Σ + m_w·s_x` for Q8_1, `d·Σ - dmin·Σ m·bsum` for Q4_K, … Because the integer parts are
exact, that equals Σ_k w_k·x_k over the *dequantized* weight w and the *dequantized* activation x (d_x·q_x)
up to f32 rounding of the scale products and of the accumulation — one exception: Q8_1's s is
f16(d·Σq), not d_x·Σq_x, so the weights' per-block minimum m meets a rounded sum (`offset`).
`Weights` (apr.engine.weights) therefore multiplies dequantized row blocks by the quantized-then-
dequantized activation with BLAS in f32 and adds `m_w · (s − d_x·Σq_x)` for Q4_1/Q5_1: within 1.5e-7
of Σ|x·w| of ggml's own kernels for every quantized type (tests/quant/test_vecdot.py), but not in their
order. For Q4_1, Q5_1, Q5_0 and Q8_0 (apr.quant.vecdot_lanes) and for Q4_K, IQ4_NL (repacked), Q5_K,
Q6_K and IQ4_XS (apr.quant.vecdot_k) it runs the kernels' own order instead, bit for bit; the other K / IQ
AVX2 kernels and the repacked Q4_0 one each order their f32 sums their own way, not reproduced here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from apr.errors import UnsupportedQuantError
from apr.quant.types import GGML_LAYOUT, QK_K, QuantType

F32Array = npt.NDArray[np.float32]
QK8: Final = 32  # elements per Q8_0 / Q8_1 block

_Q = QuantType
# ggml-cpu.c type_traits_cpu[t].vec_dot_type (ggml 0.25.3)
VEC_DOT_TYPE: Final[dict[QuantType, QuantType]] = {
    _Q.F32: _Q.F32,
    _Q.F16: _Q.F16,
    _Q.BF16: _Q.BF16,
    **{t: _Q.Q8_0 for t in (_Q.Q4_0, _Q.Q5_0, _Q.Q8_0, _Q.IQ4_NL, _Q.MXFP4, _Q.NVFP4, _Q.Q1_0)},
    _Q.Q4_1: _Q.Q8_1,
    _Q.Q5_1: _Q.Q8_1,
    **{
        t: _Q.Q8_K
        for t in (
            *(_Q.Q2_K, _Q.Q3_K, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K),
            *(_Q.IQ2_XXS, _Q.IQ2_XS, _Q.IQ2_S, _Q.IQ3_XXS, _Q.IQ3_S, _Q.IQ1_S, _Q.IQ1_M, _Q.IQ4_XS),
            *(_Q.TQ1_0, _Q.TQ2_0),
        )
    },
}
# byte offset of the f16 block minimum m in weight types whose kernels take Q8_1's s (d, m, ...)
BLOCK_MIN_OFFSET: Final[dict[QuantType, int]] = {_Q.Q4_1: 2, _Q.Q5_1: 2}


@dataclass(frozen=True, slots=True)
class Q8Blocks:
    """An activation (T, n) as ggml's from_float leaves it: d (T, nb) float32 (the scale the kernels use:
    f16-rounded for Q8_0/Q8_1, f32 for Q8_K), q (T, nb, block) int8, s (T, nb) Q8_1's f16(d·Σq) as
    float32, bsums (T, nb, 16) Q8_K's int16 sums of 16."""

    qtype: QuantType
    d: F32Array
    q: npt.NDArray[np.int8]
    s: F32Array | None = None
    bsums: npt.NDArray[np.int16] | None = None

    def values(self) -> F32Array:
        """d·q, the activation the kernels multiply by: (T, n) float32."""
        v = self.d[..., None] * self.q.astype(np.float32)
        return v.reshape(self.q.shape[0], -1)

    def to_bytes(self) -> npt.NDArray[np.uint8]:
        """ggml's block bytes (T, row bytes): block_q8_0 {f16 d; i8 qs[32]}, block_q8_1 {f16 d, s; qs},
        block_q8_K {f32 d; i8 qs[256]; i16 bsums[16]}."""
        t = self.d.shape[0]
        head = [self.d.astype("<f4" if self.qtype == _Q.Q8_K else "<f2")[..., None].view(np.uint8)]
        if self.s is not None:
            head.append(self.s.astype("<f2")[..., None].view(np.uint8))
        tail = [] if self.bsums is None else [self.bsums.astype("<i2").view(np.uint8)]
        blocks = np.concatenate([*head, self.q.view(np.uint8), *tail], axis=-1)
        assert blocks.shape[-1] == GGML_LAYOUT[self.qtype].type_size
        return blocks.reshape(t, -1)


def _blocks(x: F32Array, size: int) -> F32Array:
    x = np.asarray(x, np.float32)
    if x.shape[-1] % size:
        raise ValueError(f"rows of {x.shape[-1]} elements are not a whole number of {size}-element blocks")
    return x.reshape(x.shape[0], -1, size)


def quantize_q8_0(x: F32Array) -> Q8Blocks:
    """ggml-cpu's AVX2 `quantize_row_q8_0` of each row of x (T, n)."""
    d, q = _q8_32(x)
    return Q8Blocks(_Q.Q8_0, d.astype(np.float16).astype(np.float32), q)


def quantize_q8_1(x: F32Array) -> Q8Blocks:
    """ggml-cpu's AVX2 `quantize_row_q8_1`: Q8_0's blocks plus s = f16(d · Σq) with d unrounded."""
    d, q = _q8_32(x)
    s = (d * q.sum(axis=-1, dtype=np.int32).astype(np.float32)).astype(np.float16).astype(np.float32)
    return Q8Blocks(_Q.Q8_1, d.astype(np.float16).astype(np.float32), q, s=s)


def _q8_32(x: F32Array) -> tuple[F32Array, npt.NDArray[np.int8]]:
    b = _blocks(x, QK8)  # (T, nb, 32)
    amax = np.abs(b).max(axis=-1)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(b * inv[..., None]).astype(np.int8)  # _mm256_round_ps(_MM_ROUND_NEAREST): half to even
    return d.astype(np.float32), q


def quantize_q8_K(x: F32Array) -> Q8Blocks:
    """ggml's `quantize_row_q8_K_ref` (what x86 runs): iscale = -127/max with max the signed value of
    largest magnitude (the first), q = min(127, nearest_int(iscale·x)) (half to even), d = 1/iscale.
    The repacked Q4_K gemm's 4-row `ggml_quantize_mat_t<4, Q8_K>` gives the same scales, ties included
    (tests/quant/test_vecdot.py)."""
    b = _blocks(x, QK_K)  # (T, nb, 256)
    first = np.abs(b).argmax(axis=-1)
    signed = np.take_along_axis(b, first[..., None], axis=-1)[..., 0]
    zero = signed == 0
    with np.errstate(divide="ignore"):
        iscale = np.where(zero, np.float32(0), np.float32(-127) / np.where(zero, 1, signed)).astype(
            np.float32
        )
        d = np.where(zero, np.float32(0), np.float32(1) / iscale).astype(np.float32)
    q = np.minimum(127, np.rint(b * iscale[..., None])).astype(np.int8)
    bsums = q.reshape(*q.shape[:2], QK_K // 16, 16).sum(axis=-1, dtype=np.int16)
    return Q8Blocks(_Q.Q8_K, d, q, bsums=bsums)


def _round_bf16(x: F32Array) -> F32Array:
    """ggml's GGML_FP32_TO_BF16 (round to nearest even; NaN kept quiet) and back to float32."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) & np.uint32(0xFFFF0000)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, (u | 0x00400000) & np.uint32(0xFFFF0000), rounded).astype(np.uint32).view(np.float32)


ACTIVATION_QUANTIZERS: Final = {_Q.Q8_0: quantize_q8_0, _Q.Q8_1: quantize_q8_1, _Q.Q8_K: quantize_q8_K}


@dataclass(frozen=True, slots=True)
class Activation:
    """What a ggml matmul against a weight of `wtype` multiplies by: `values` (T, n) float32, and for the
    Q8_1 types `offset` (T, nb) = s − d·Σq, the part of Q8_1's rounded s the weights' minimum m meets."""

    wtype: QuantType
    values: F32Array
    offset: F32Array | None = None
    blocks: Q8Blocks | None = None  # the quantized activation itself (Q8_0 / Q8_1 / Q8_K)


def _quantized(x: F32Array, wtype: QuantType, vdt: QuantType) -> Activation:
    return _wrap(ACTIVATION_QUANTIZERS[vdt](x), wtype)


def _wrap(blocks: Q8Blocks, wtype: QuantType) -> Activation:
    offset = None
    if blocks.s is not None:
        offset = blocks.s - blocks.d * blocks.q.sum(axis=-1, dtype=np.int32).astype(np.float32)
    return Activation(wtype, blocks.values(), offset, blocks)


def _rounded(x: F32Array, wtype: QuantType, dtype: type[np.floating[Any]]) -> Activation:
    return Activation(wtype, x.astype(dtype).astype(np.float32))  # F16C: round to nearest even


Convert = Callable[[F32Array, QuantType], Activation]
# vec_dot_type → how an f32 activation becomes it (and what the kernels then see, as float32)
CONVERTERS: Final[dict[QuantType, Convert]] = {
    _Q.F32: lambda x, wtype: Activation(wtype, x),
    _Q.F16: partial(_rounded, dtype=np.float16),
    _Q.BF16: lambda x, wtype: Activation(wtype, _round_bf16(x)),
    **{vdt: partial(_quantized, vdt=vdt) for vdt in ACTIVATION_QUANTIZERS},
}


def activation(x: F32Array, wtype: QuantType) -> Activation:
    """x (T, n) converted as ggml-cpu does before multiplying it by a `wtype` weight."""
    vdt = VEC_DOT_TYPE.get(wtype)
    if vdt is None:
        raise UnsupportedQuantError(f"ggml-cpu has no matmul for {wtype.name} weights")
    return CONVERTERS[vdt](np.asarray(x, np.float32), wtype)


def block_minimums(raw: npt.NDArray[np.uint8], wtype: QuantType, rows: int) -> F32Array | None:
    """The f16 per-block minimum m of a Q4_1/Q5_1 weight's rows (rows, nb) as float32; None for others."""
    at = BLOCK_MIN_OFFSET.get(wtype)
    if at is None:
        return None
    blocks = np.asarray(raw, np.uint8).reshape(rows, -1, GGML_LAYOUT[wtype].type_size)
    return np.ascontiguousarray(blocks[..., at : at + 2]).view("<f2")[..., 0].astype(np.float32)
