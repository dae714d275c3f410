"""ggml-cpu's x86 kernels for the K and IQ4 weight types, bit for bit: the order of their f32 work.

What llama.cpp runs on this build (AVX2 + FMA, `REPACK = 1`; `ggml_repack_get_optimal_repack_type`):

- Q4_K weights whose row count is a multiple of 8 are repacked to `q4_K_8x8` (repack.cpp) and multiplied by
  `ggml_gemm_q4_K_8x8_q8_K` for each group of 4 activation rows (`ne11 - ne11 % 4` of them, quantized by
  `ggml_quantize_mat_q8_K_4x8`) and by `ggml_gemv_q4_K_8x8_q8_K` for the rest (`quantize_row_q8_K`, the
  reference). Per output both keep two f32 accumulators, `acc = fma(f32(Σ sc·q·q8), d_w·d_x, acc)` and
  `acc_min = fma(f32(Σ m·bsum), dmin_w·d_x, acc_min)`, and return `acc - acc_min`; gemv takes one integer per
  256-element super-block, gemm one per 64 elements (two sub-blocks).
- IQ4_NL weights (rows a multiple of 8) are repacked to `iq4_nl_8x8` and multiplied per 32-element block:
  `acc = fma(f32(Σ q·q8), d_w·d_x, acc)`, one accumulator, no horizontal sum (gemm and gemv alike).
- From 8 activation rows on, Q5_K, Q6_K, IQ4_XS (and a Q4_K weight ggml does not repack) go through the
  tiled K-quant matmul (tiled/tiled-kernel.cpp; on unless GGML_CPU_TILED_MM=0): per super-block in order,
  res = d_w·f32(s1) (minus fma dmin_w·f32(s2)) and acc = fma(res, d_x, acc), s1 = Σ sc·w·q8 exact.
- Below 8 rows, Q5_K, Q6_K and IQ4_XS run `ggml_vec_dot_<t>_q8_K` (arch/x86/quants.c): 8 int32
  lanes per super-block, lane l = Σ over the elements 4l..4l+3 of each 32-element block of (integer scale ×
  quant × q8) — Q6_K's quants unsigned, minus 32·Σ sc·bsum of sub-blocks 2l, 2l+1 in lane l; then
  `acc = fma(d_w·d_x, f32(lane), acc)` per super-block and the horizontal sum ((a0+a4) + (a2+a6)) +
  ((a1+a5) + (a3+a7)). Q5_K adds its minimum term as a separate f32 running sum after the horizontal sum,
  `summs = fma(−d_x·dmin_w, f32(Σ m·bsum), summs)` (the compiler contracts `summs += dmin * m`).

Checked against llama.cpp's own stage captures of dense models (tests/engine/test_ggml_precision.py);
the MoE path (MUL_MAT_ID, `Weights.expert_linear`) takes the same kernels here but is not checked.

The integer parts come from the dequantizers with the block scales patched (d = 1, dmin = 0 gives sc·q;
d = 0, dmin = 1 gives −m) and exact float64 matmuls; each FMA is a float64 product and sum rounded once to
f32 (as apr.quant.vecdot_lanes). The gemm's 4-row activation quantizer gives the reference's blocks
(tests/quant/test_vecdot.py), so every row reads `quantize_q8_K`.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from apr.quant.blocks import DEQUANTIZERS
from apr.quant.types import GGML_LAYOUT, QK_K, QuantType

F32Array = npt.NDArray[np.float32]
F64Array = npt.NDArray[np.float64]
U8Array = npt.NDArray[np.uint8]
_Q = QuantType
LANES: Final = 8
WORK_ELEMS: Final = 1 << 22  # float64 lane sums per activation chunk: 32 MiB
ONE: Final = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
ZERO: Final = np.zeros(2, np.uint8)
REPACKED: Final = frozenset({_Q.Q4_K, _Q.IQ4_NL})  # on AVX2, when the weight's rows are a multiple of 8
REPACK_ROWS: Final = 8
# byte offsets of the f16 d (and dmin) in each block
D_AT: Final[dict[QuantType, int]] = {_Q.Q4_K: 0, _Q.Q5_K: 0, _Q.Q6_K: 208, _Q.IQ4_XS: 0, _Q.IQ4_NL: 0}
DMIN_AT: Final[dict[QuantType, int]] = {_Q.Q4_K: 2, _Q.Q5_K: 2}


def _blocks(raw: U8Array, wtype: QuantType, rows: int) -> U8Array:
    return np.asarray(raw, np.uint8).reshape(rows, -1, GGML_LAYOUT[wtype].type_size)


def _f16(blocks: U8Array, at: int) -> F32Array:
    """(rows, nb) float32 of the f16 at byte `at` of every block."""
    return np.ascontiguousarray(blocks[..., at : at + 2]).view("<f2")[..., 0].astype(np.float32)


def _decoded(blocks: U8Array, wtype: QuantType, d: U8Array, dmin: U8Array | None = None) -> F32Array:
    """The blocks dequantized with their d (and dmin) replaced: (rows, n) float32."""
    patched = np.array(blocks)
    at = D_AT[wtype]
    patched[..., at : at + 2] = d
    if dmin is not None:
        m_at = DMIN_AT[wtype]
        patched[..., m_at : m_at + 2] = dmin
    rows, nb, _ = blocks.shape
    n = nb * GGML_LAYOUT[wtype].block_size
    return DEQUANTIZERS[wtype].decode(patched.reshape(-1), rows * n, 1).reshape(rows, n)


def _fma(a: npt.ArrayLike, b: npt.ArrayLike, c: npt.ArrayLike) -> F32Array:
    """fma(a, b, c) rounded once to float32 (a, b float32: their product is exact in float64)."""
    out: F32Array = (
        np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)
    ).astype(np.float32)
    return out


def _hsum8(acc: F32Array) -> F32Array:
    """hsum_float_8 over axis 0 of (8, ...) float32."""
    r = acc[4:] + acc[:4]
    out: F32Array = (r[0] + r[2]) + (r[1] + r[3])
    return out


def _group_sums(w: F64Array, x: F64Array, groups: int, lanes: bool) -> F64Array:
    """Exact integer sums Σ w·x per (group, weight row, activation row): (groups[, 8], rows, T) float64.

    w (rows, n), x (T, n) hold integers. Each of `groups` equal spans of n is one group; with `lanes`, a
    group is split further into the 8 lanes of the AVX2 kernels (element e of the span in lane (e % 32) // 4).
    """
    rows, n = w.shape
    t = x.shape[0]
    span = n // groups
    if not lanes:
        wg = w.reshape(rows, groups, span).transpose(1, 0, 2)  # (g, rows, span)
        xg = x.reshape(t, groups, span).transpose(1, 2, 0)  # (g, span, T)
        out: F64Array = wg @ xg
        return out
    blocks = span // 32
    wl = w.reshape(rows, groups, blocks, LANES, 4).transpose(1, 3, 0, 2, 4).reshape(groups, LANES, rows, -1)
    xl = x.reshape(t, groups, blocks, LANES, 4).transpose(1, 3, 2, 4, 0).reshape(groups, LANES, -1, t)
    lane: F64Array = wl @ xl  # (g, 8, rows, T)
    return lane


class Q8View:
    """The part of an activation's Q8 blocks a kernel reads: q (T, n) as float64, d (T, nb) float32, and
    for Q8_K the sub-block sums bsum (T, nb, 16) as float64."""

    def __init__(self, q: npt.NDArray[np.int8], d: F32Array, bsums: npt.NDArray[np.int16] | None) -> None:
        t = q.shape[0]
        self.q: F64Array = q.reshape(t, -1).astype(np.float64)
        self.d = d
        self.bsums: F64Array | None = None if bsums is None else bsums.astype(np.float64)

    def rows(self, a: int, b: int) -> Q8View:
        view = Q8View.__new__(Q8View)
        view.q, view.d = self.q[a:b], self.d[a:b]
        view.bsums = None if self.bsums is None else self.bsums[a:b]
        return view


def _min_ints(blocks: U8Array, wtype: QuantType, x: Q8View, groups_per_block: int) -> F64Array:
    """Σ m_j · bsum_j (sub-blocks j of 32) per group: (nb·groups_per_block, rows, T) float64."""
    m = -_decoded(blocks, wtype, ZERO, ONE)[:, ::32].astype(np.float64)  # (rows, nb·8)
    assert x.bsums is not None
    b32 = x.bsums.reshape(x.bsums.shape[0], -1, 2).sum(axis=-1)  # (T, nb·8)
    return _group_sums(m, b32, blocks.shape[1] * groups_per_block, lanes=False)


def _q4_k_repacked(raw: U8Array, rows: int, x: Q8View, gemm: bool) -> F32Array:
    """ggml_gemm_q4_K_8x8_q8_K (gemm) / ggml_gemv_q4_K_8x8_q8_K: (rows, T)."""
    b = _blocks(raw, _Q.Q4_K, rows)
    nb = b.shape[1]
    per = 4 if gemm else 1  # integers per super-block
    w = _decoded(b, _Q.Q4_K, ONE, ZERO).astype(np.float64)  # sc·q
    ints = _group_sums(w, x.q, nb * per, lanes=False).astype(np.float32)  # (nb·per, rows, T)
    mins = _min_ints(b, _Q.Q4_K, x, per).astype(np.float32)
    scale = _f16(b, 0)[:, None, :] * x.d[None]  # (rows, T, nb) f32 products
    dmin = _f16(b, 2)[:, None, :] * x.d[None]
    acc = np.zeros(ints.shape[1:], np.float32)
    acc_min = np.zeros_like(acc)
    for g in range(nb * per):
        acc = _fma(ints[g], scale[..., g // per], acc)
        acc_min = _fma(mins[g], dmin[..., g // per], acc_min)
    out: F32Array = acc - acc_min
    return out


def _iq4_nl_repacked(raw: U8Array, rows: int, x: Q8View) -> F32Array:
    """ggml_gemm/gemv_iq4_nl_8x8_q8_0: (rows, T)."""
    b = _blocks(raw, _Q.IQ4_NL, rows)
    nb = b.shape[1]
    w = _decoded(b, _Q.IQ4_NL, ONE).astype(np.float64)
    ints = _group_sums(w, x.q, nb, lanes=False).astype(np.float32)  # (nb, rows, T)
    scale = _f16(b, 0)[:, None, :] * x.d[None]  # (rows, T, nb)
    acc = np.zeros(ints.shape[1:], np.float32)
    for g in range(nb):
        acc = _fma(ints[g], scale[..., g], acc)
    return acc


def _lane_kernel(raw: U8Array, wtype: QuantType, rows: int, x: Q8View) -> F32Array:
    """ggml_vec_dot_{q5_K,q6_K,iq4_xs}_q8_K (AVX2): (rows, T)."""
    b = _blocks(raw, wtype, rows)
    nb = b.shape[1]
    w = _decoded(b, wtype, ONE, ZERO if wtype in DMIN_AT else None).astype(np.float64)  # (rows, n)
    if wtype == _Q.Q6_K:  # sc·(q − 32) → sc·q, and the −32·Σ sc·bsum of sub-blocks 2l, 2l+1 in lane l
        sc = b[..., 192:208].view(np.int8).astype(np.float64)  # (rows, nb, 16)
        w = w + 32 * np.repeat(sc.reshape(rows, -1), 16, axis=1)
    lanes = _group_sums(w, x.q, nb, lanes=True)  # (nb, 8, rows, T)
    if wtype == _Q.Q6_K:
        assert x.bsums is not None
        sub = np.einsum("rbls,tbls->blrt", sc.reshape(rows, nb, LANES, 2), x.bsums.reshape(-1, nb, LANES, 2))
        lanes = lanes - 32 * sub
    lanes32 = lanes.astype(np.float32)
    d = _f16(b, D_AT[wtype])[:, None, :] * x.d[None]  # (rows, T, nb)
    acc = np.zeros((LANES, *d.shape[:2]), np.float32)
    for g in range(nb):
        acc = _fma(d[None, ..., g], lanes32[g], acc)
    total = _hsum8(acc)
    if wtype == _Q.Q5_K:
        mins = _min_ints(b, wtype, x, 1).astype(np.float32)  # (nb, rows, T)
        dmin = -x.d[None] * _f16(b, DMIN_AT[wtype])[:, None, :]  # (rows, T, nb)
        summs = np.zeros_like(total)
        for g in range(nb):
            summs = _fma(dmin[..., g], mins[g], summs)  # the compiler contracts `summs += dmin * m`
        total = total + summs
    return total


def _tiled(raw: U8Array, wtype: QuantType, rows: int, x: Q8View) -> F32Array:
    """ggml-cpu's tiled K-quant matmul (tiled/tiled-kernel.cpp, AVX2), per output and super-block b in
    order: res = d_w · f32(s1) (− fma dmin_w · f32(s2) with a minimum), acc = fma(res, d_x, acc); s1 the
    exact Σ sc·w·q8 of the super-block (w debiased: Q6_K q − 32, IQ4_XS the codebook value), s2 Σ m·bsum."""
    b = _blocks(raw, wtype, rows)
    nb = b.shape[1]
    has_min = wtype in DMIN_AT
    w = _decoded(b, wtype, ONE, ZERO if has_min else None).astype(np.float64)  # sc·w
    s1 = _group_sums(w, x.q, nb, lanes=False).astype(np.float32)  # (nb, rows, T)
    d_w = _f16(b, D_AT[wtype])  # (rows, nb)
    mins = _min_ints(b, wtype, x, 1).astype(np.float32) if has_min else None
    dmin = _f16(b, DMIN_AT[wtype]) if has_min else None
    acc = np.zeros(s1.shape[1:], np.float32)
    for g in range(nb):
        res = d_w[:, g, None] * s1[g]
        if mins is not None and dmin is not None:
            res = _fma(-dmin[:, g, None], mins[g], res)  # _mm256_fnmadd_ps
        acc = _fma(res, x.d[None, :, g], acc)
    return acc


TILED: Final = frozenset({_Q.Q4_K, _Q.Q5_K, _Q.Q6_K, _Q.IQ4_XS})  # of K_TYPES, what the tiled path takes
TILED_MIN_TOKENS: Final = 8  # ggml_tiled_min_batch: the tiled path from 8 activation rows on


def kernel(wtype: QuantType, rows: int, tokens: int) -> str | None:
    """Which of the emulated kernels ggml-cpu (AVX2, REPACK, tiled matmul on) runs for a `wtype` weight of
    `rows` rows × `tokens` activation rows: "repack", "tiled", "vec_dot", or None (not emulated here: a
    Q4_K weight it neither repacks nor tiles, an IQ4_NL weight it does not repack)."""
    if wtype not in K_TYPES:
        return None
    if wtype in REPACKED and rows % REPACK_ROWS == 0:
        return "repack"
    if wtype in TILED and tokens >= TILED_MIN_TOKENS:
        return "tiled"
    return None if wtype in REPACKED else "vec_dot"


def k_dot(
    raw: U8Array,
    wtype: QuantType,
    rows: int,
    q: npt.NDArray[np.int8],
    d: F32Array,
    bsums: npt.NDArray[np.int16] | None,
    tensor_rows: int | None = None,
) -> F32Array:
    """The kernel's result for `rows` weight rows × every activation row: (rows, T) float32, for the
    kernel `kernel(wtype, tensor_rows, T)` names (tensor_rows: the whole weight's rows, default `rows`).

    q (T, nb', block) and d (T, nb') are the activation's Q8_K (Q8_0 for IQ4_NL) blocks, bsums Q8_K's sums
    of 16 (T, nb', 16)."""
    t = q.shape[0]
    how = kernel(wtype, rows if tensor_rows is None else tensor_rows, t)
    if how is None:
        raise ValueError(f"no emulated ggml kernel for {wtype.name} with {rows} rows × {t} tokens")
    view = Q8View(q, d, bsums)
    out = np.empty((rows, t), np.float32)
    nb = view.q.shape[1] // 32
    step = max(1, WORK_ELEMS // max(1, rows * nb))
    gemm_rows = t - t % 4  # ggml's repacked mul_mat: groups of 4 activation rows by gemm, the rest by gemv
    for t0 in range(0, t, step):
        t1 = min(t, t0 + step)
        if how == "tiled":
            out[:, t0:t1] = _tiled(raw, wtype, rows, view.rows(t0, t1))
        elif wtype == _Q.Q4_K:
            cut = min(max(gemm_rows, t0), t1)
            if cut > t0:
                out[:, t0:cut] = _q4_k_repacked(raw, rows, view.rows(t0, cut), gemm=True)
            if t1 > cut:
                out[:, cut:t1] = _q4_k_repacked(raw, rows, view.rows(cut, t1), gemm=False)
        elif wtype == _Q.IQ4_NL:
            out[:, t0:t1] = _iq4_nl_repacked(raw, rows, view.rows(t0, t1))
        else:
            out[:, t0:t1] = _lane_kernel(raw, wtype, rows, view.rows(t0, t1))
    return out


K_TYPES: Final = frozenset({_Q.Q4_K, _Q.Q5_K, _Q.Q6_K, _Q.IQ4_XS, _Q.IQ4_NL})
assert all(GGML_LAYOUT[t].block_size in (32, QK_K) for t in K_TYPES)
