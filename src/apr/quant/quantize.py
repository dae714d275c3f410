"""Quantizers: float32 → Q8_0, Q5_0, Q4_K, Q6_K (and the trivial F32, F16, BF16), as ggml's reference code.

These follow ggml's `quantize_row_{q8_0,q5_0,q4_K,q6_K}_ref` (ggml-quants.c; what `ggml_quantize_chunk` and
llama.cpp's quantizer run without an importance matrix) step for step, vectorized over every block of
a chunk: the same float32 operations in the same order, sums accumulated left to right (never numpy's
pairwise sum), `nearest_int` as ggml's add-1.5·2²³ trick, and `roundf` as round-half-away. The output
is then byte-identical to ggml on finite input. Each quantizer maps `(n_blocks, block_size)` float32 to
`(n_blocks, type_size)` uint8 and registers itself in `QUANTIZERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Final

import numpy as np
import numpy.typing as npt

from apr.errors import UnsupportedQuantError, ValidationError
from apr.quant.types import QUANT_LAYOUT, QuantType

F32Array = npt.NDArray[np.float32]
I32Array = npt.NDArray[np.int32]
U8Array = npt.NDArray[np.uint8]
BlockQuantizer = Callable[[F32Array], U8Array]

QUANTIZERS: Final[dict[QuantType, BlockQuantizer]] = {}
CHUNK_ELEMS: Final = 1 << 17  # values per quantizer call; bounds the search temporaries
GROUP_MAX_EPS: Final = np.float32(1e-15)
f32 = np.float32


class BlockShapeError(ValidationError, ValueError):
    """Values to quantize whose rows are not a whole number of the type's blocks."""


def quantize(values: npt.NDArray[np.float32], qtype: QuantType) -> npt.NDArray[np.uint8]:
    """`values` stored as `qtype`: uint8 of shape (*values.shape[:-1], bytes per row)."""
    quantizer = QUANTIZERS.get(qtype)
    if quantizer is None:
        raise UnsupportedQuantError(f"no quantizer for {qtype.name} ({int(qtype)})")
    x = np.asarray(values, dtype=np.float32)
    layout = QUANT_LAYOUT[qtype]
    cols = x.shape[-1] if x.ndim else 1
    if cols % layout.block_size:
        raise BlockShapeError(
            f"cannot quantize to {qtype.name}: rows of {cols} values are not a whole number "
            f"of {layout.block_size}-value blocks"
        )
    blocks = x.reshape(-1, layout.block_size)
    out = np.empty((len(blocks), layout.type_size), np.uint8)
    step = max(1, CHUNK_ELEMS // layout.block_size)
    with np.errstate(all="ignore"):
        for i in range(0, len(blocks), step):
            out[i : i + step] = quantizer(blocks[i : i + step])
    return out.reshape(*x.shape[:-1], cols // layout.block_size * layout.type_size)


# llama-quantize's substitute for a type whose blocks do not fit a tensor's rows (llama-quant.cpp, after
# `convert_incompatible_tensor`); then Q8_0 (for a format that cannot store the substitute), F16, F32
FALLBACK: Final[dict[QuantType, QuantType]] = {QuantType.Q4_K: QuantType.Q5_0, QuantType.Q6_K: QuantType.Q8_0}
LAST_RESORTS: Final = (QuantType.Q8_0, QuantType.F16, QuantType.F32)


def fitting_type(want: QuantType, cols: int, storable: Collection[QuantType] | None = None) -> QuantType:
    """`want`, or what llama-quantize stores instead when rows of `cols` values are not whole blocks of it
    (skipping types the output format cannot store, when `storable` says which it can)."""
    for qtype in (want, FALLBACK.get(want), *LAST_RESORTS):
        fits = qtype is not None and cols % QUANT_LAYOUT[qtype].block_size == 0
        if fits and (storable is None or qtype in storable):
            return qtype  # type: ignore[return-value]
    return QuantType.F32


def register(qtype: QuantType) -> Callable[[BlockQuantizer], BlockQuantizer]:
    def add(quantizer: BlockQuantizer) -> BlockQuantizer:
        QUANTIZERS[qtype] = quantizer
        return quantizer

    return add


# --- ggml's scalar helpers, vectorized --------------------------------------------------------------


def nearest_int(v: F32Array) -> I32Array:
    """ggml's `nearest_int`: round half to even through the float32 sum with 1.5 * 2**23."""
    bits = (v + f32(12582912.0)).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def round_away(v: F32Array) -> F32Array:
    """C's `roundf`: to the nearest integer, halves away from zero (exact, no +0.5 rounding)."""
    t = np.trunc(v)
    return np.where(np.abs(v - t) >= f32(0.5), t + np.sign(v), t)


def seq_sum(terms: F32Array) -> F32Array:
    """Sum over axis 0 left to right in float32, like ggml's `for (i...) s += t[i]`."""
    acc: F32Array = np.array(terms[0], dtype=np.float32)
    for t in terms[1:]:
        acc += t
    return acc


def f16_bytes(v: F32Array) -> U8Array:
    """`GGML_FP32_TO_FP16` (round to nearest even) as little-endian bytes, shape (n, 2)."""
    return v.astype("<f2").reshape(-1, 1).view(np.uint8)


def f16_round(v: F32Array) -> F32Array:
    """`GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v))`."""
    return v.astype(np.float16).astype(np.float32)


# --- plain types ------------------------------------------------------------------------------------


@register(QuantType.F32)
def _f32(x: F32Array) -> U8Array:
    return x.astype("<f4").view(np.uint8)


@register(QuantType.F16)
def _f16(x: F32Array) -> U8Array:
    return x.astype("<f2").view(np.uint8)


@register(QuantType.BF16)
def _bf16(x: F32Array) -> U8Array:
    """`ggml_compute_fp32_to_bf16`: NaN → quiet NaN, else round to nearest even."""
    u = x.view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    quiet = (u >> np.uint32(16)) | np.uint32(64)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, quiet, rounded).astype("<u2").view(np.uint8)


# --- Q8_0 -------------------------------------------------------------------------------------------


@register(QuantType.Q8_0)
def _q8_0(x: F32Array) -> U8Array:
    """`quantize_row_q8_0_ref`: d = amax / 127, q = roundf(x / d)."""
    d = np.abs(x).max(axis=1, keepdims=True) / f32(127)
    inv = np.where(d != 0, f32(1) / d, f32(0))
    q = round_away(x * inv).astype(np.int8)
    return np.concatenate([f16_bytes(d), q.view(np.uint8)], axis=1)


@register(QuantType.Q5_0)
def _q5_0(x: F32Array) -> U8Array:
    """`quantize_row_q5_0_ref`: d = (the first value of largest magnitude) / −16, q = min(31, ⌊x/d + 16.5⌋);
    the low 4 bits of q[j] and q[j + 16] share byte j of qs, the fifth bits make the u32 qh."""
    big = x[np.arange(len(x)), np.abs(x).argmax(axis=1)][:, None]
    d = big / f32(-16)
    inv = np.where(d != 0, f32(1) / d, f32(0))
    q = np.minimum(x * inv + f32(16.5), f32(31)).astype(np.int32)  # (int) truncates; the value is ≥ 0.5
    low = (q & 0x0F).astype(np.uint8)
    qs = low[:, :16] | (low[:, 16:] << np.uint8(4))
    qh = (((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    return np.concatenate([f16_bytes(d), qh.astype("<u4").reshape(-1, 1).view(np.uint8), qs], axis=1)


# --- Q4_K -------------------------------------------------------------------------------------------


def make_qkx2_quants(
    x: F32Array, w: F32Array, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[F32Array, F32Array, U8Array]:
    """ggml's `make_qkx2_quants` (use_mad = false) for each column of x, w: (n, m).

    Returns (scale, the_min, L) with x ≈ scale * L - the_min, L in 0..nmax.
    """
    mx = x.max(axis=0)
    mn = np.minimum(x.min(axis=0), f32(0))
    flat = mx == mn
    mn0 = mn
    sum_w, sum_x = seq_sum(w), seq_sum(w * x)
    iscale = f32(nmax) / (mx - mn)
    scale = f32(1) / iscale
    L = np.clip(nearest_int(iscale * (x - mn)), 0, nmax).astype(np.float32)
    best = seq_sum(w * np.square((scale * L + mn) - x))
    for step in range(nstep + 1):
        iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / (mx - mn)
        laux = np.clip(nearest_int(iscale * (x - mn)), 0, nmax).astype(np.float32)
        wl = w * laux
        sum_l, sum_l2, sum_xl = seq_sum(wl), seq_sum(wl * laux), seq_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clamp = this_min > 0
        this_min = np.where(clamp, f32(0), this_min)
        this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
        error = seq_sum(w * np.square((this_scale * laux + this_min) - x))
        better = (det > 0) & (error < best)
        L = np.where(better, laux, L)
        best = np.where(better, error, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    L[:, flat] = 0
    return np.where(flat, f32(0), scale), -np.where(flat, mn0, mn), L.astype(np.uint8)


def _six_bit_levels(values: F32Array, top: F32Array) -> U8Array:
    """`uint8_t l = nearest_int(63/top * v); MIN(63, l)` per row (0 where top is not > 0)."""
    inv = np.where(top > 0, f32(63) / top, f32(0))
    levels: U8Array = np.minimum(nearest_int(inv[:, None] * values) & 0xFF, 63).astype(np.uint8)
    return levels


def pack_scale_min_k4(ls: U8Array, lm: U8Array) -> U8Array:
    """The 12 scale bytes of Q4_K/Q5_K from 8 six-bit scales and mins (inverse of get_scale_min_k4)."""
    lo = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    hi = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    packed: U8Array = np.concatenate([lo, mid, hi], axis=1).astype(np.uint8)
    return packed


@register(QuantType.Q4_K)
def _q4_k(x: F32Array) -> U8Array:
    """`quantize_row_q4_K_ref`: 8 sub-blocks of 32, 6-bit scales and mins, 4-bit quants."""
    nb = len(x)
    sub = np.ascontiguousarray(x.reshape(nb * 8, 32).T)  # (32, sub-blocks): sums down axis 0
    av_x = np.sqrt(seq_sum(sub * sub) / f32(32))
    scales, mins, L = make_qkx2_quants(sub, av_x + np.abs(sub), 15, -1.0, 0.1, 20)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale = np.maximum(scales.max(axis=1), f32(0))
    max_min = np.maximum(mins.max(axis=1), f32(0))
    ls, lm = _six_bit_levels(scales, max_scale), _six_bit_levels(mins, max_min)
    d, dmin = max_scale / f32(63), max_min / f32(63)
    dq = (f16_round(d)[:, None] * ls.astype(np.float32))[:, :, None]
    dm = (f16_round(dmin)[:, None] * lm.astype(np.float32))[:, :, None]
    blocks = x.reshape(nb, 8, 32)
    requant = np.clip(nearest_int((blocks + dm) / dq), 0, 15).astype(np.uint8)
    q = np.where(dq != 0, requant, L.T.reshape(nb, 8, 32)).reshape(nb, 4, 2, 32)
    qs = q[:, :, 0] | (q[:, :, 1] << 4)
    parts = [f16_bytes(d), f16_bytes(dmin), pack_scale_min_k4(ls, lm), qs.reshape(nb, 128)]
    return np.concatenate(parts, axis=1)


# --- Q6_K -------------------------------------------------------------------------------------------


def make_qx_quants(x: F32Array, nmax: int) -> tuple[F32Array, U8Array]:
    """ggml's `make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL)` for each column of x: (n, m).

    Returns (scale, L) with x ≈ scale * (L - nmax), L in 0..2·nmax−1 (all 0 for an all-zero column).
    """
    cols = np.arange(x.shape[1])
    amax = np.abs(x).max(axis=0)
    mx = x[np.abs(x).argmax(axis=0), cols]  # the first element of largest magnitude, signed
    w = x * x
    wx = w * x

    def trial(iscale: F32Array) -> tuple[F32Array, F32Array, F32Array]:
        lv = np.clip(nearest_int(iscale * x), -nmax, nmax - 1).astype(np.float32)
        return lv, seq_sum(wx * lv), seq_sum((w * lv) * lv)

    L, sumlx, suml2 = trial(f32(-nmax) / mx)
    scale = np.where(suml2 != 0, sumlx / suml2, f32(0))
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        lv, sumlx, suml2 = trial(-(f32(nmax) + f32(0.1) * f32(step)) / mx)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(better, lv, L)
        scale = np.where(better, sumlx / suml2, scale)
        best = np.where(better, scale * sumlx, best)
    zero = amax < GROUP_MAX_EPS
    L = np.where(zero, f32(0), L + f32(nmax))
    return np.where(zero, f32(0), scale), L.astype(np.uint8)


def _pack_q6(L: U8Array) -> tuple[U8Array, U8Array]:
    """ql[128], qh[64] of Q6_K from the 256 6-bit quants of each block (n, 256)."""
    q = L.reshape(-1, 2, 4, 32)  # (half, group of 32, l)
    ql = (q[:, :, :2] & 0x0F) | ((q[:, :, 2:] & 0x0F) << 4)  # groups 0,1 low; 2,3 high nibble
    qh = (q >> 4) << np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    low = ql.reshape(-1, 128).astype(np.uint8)
    high: U8Array = np.bitwise_or.reduce(qh, axis=2).reshape(-1, 64)
    return low, high


@register(QuantType.Q6_K)
def _q6_k(x: F32Array) -> U8Array:
    """`quantize_row_q6_K_ref`: 16 sub-blocks of 16, int8 scales, 6-bit quants."""
    nb = len(x)
    scales, L = make_qx_quants(np.ascontiguousarray(x.reshape(nb * 16, 16).T), 32)
    scales = scales.reshape(nb, 16)
    rows = np.arange(nb)
    max_scale = scales[rows, np.abs(scales).argmax(axis=1)]
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    iscale = f32(-128) / max_scale
    d = f32(1) / iscale
    sc = np.minimum(127, nearest_int(iscale[:, None] * scales)).astype(np.int8)
    dq = (f16_round(d)[:, None] * sc.astype(np.float32))[:, :, None]
    blocks = x.reshape(nb, 16, 16)
    requant = (np.clip(nearest_int(blocks / dq), -32, 31) + 32).astype(np.uint8)
    q = np.where(dq != 0, requant, L.T.reshape(nb, 16, 16)).reshape(nb, 256)
    ql, qh = _pack_q6(q)
    out = np.concatenate([ql, qh, sc.view(np.uint8), f16_bytes(d)], axis=1)
    out[zero] = 0
    return out
