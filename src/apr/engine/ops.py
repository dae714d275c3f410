"""Pure numpy building blocks of the decoder forward pass. No I/O, no state, no knowledge of stages.

Legend: T tokens, D hidden, H query heads, Hkv key/value heads, Dh head dim, I ffn width.
Every function keeps its input dtype (f32 by default, f64 for the high-precision reference).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from apr.engine import ggml_math

Array = npt.NDArray[Any]


def rms_norm(x: Array, w: Array, eps: float) -> Array:
    """x · (1 / sqrt(mean(x²) + eps)) · w over the last axis, in ggml's order (ggml_compute_forward_rms_norm
    then MUL): the squares in x's dtype summed in float64, the mean rounded back, one reciprocal. In f32 that
    is llama.cpp's bits, which `--precision ggml` needs: its activation quantizer turns a one-ulp
    difference here into whole rounding steps."""
    total = np.square(x).astype(np.float64).sum(axis=-1, keepdims=True)  # (..., 1)
    mean = (total / x.shape[-1]).astype(x.dtype)  # (..., 1)
    scale = x.dtype.type(1) / np.sqrt(mean + x.dtype.type(eps))  # (..., 1)
    out: Array = x * scale * w  # (..., D)
    return out


def _rotate(x0: Array, x1: Array, c: Array, s: Array, fused: bool) -> tuple[Array, Array]:
    """(x0·c − x1·s, x1·c + x0·s); `fused` as ggml-cpu's compiled `rotate_pairs` (float32):
    fma(x0, c, −(x1·s)) and fma(x0, s, x1·c)."""
    if not fused:
        return x0 * c - x1 * s, x1 * c + x0 * s
    return ggml_math.fma(x0, c, -(x1 * s)), ggml_math.fma(x0, s, x1 * c)


def rope_half_split(x: Array, cos: Array, sin: Array, fused: bool = False) -> Array:
    """HF rotate_half (NEOX): element i pairs with i + Dh/2. x: (T, heads, Dh). `fused`: ggml's float32
    arithmetic (`_rotate`)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # (T, heads, Dh/2) each
    c, s = cos[:, None, :], sin[:, None, :]  # (T, 1, Dh/2)
    out: Array = np.concatenate(_rotate(x1, x2, c, s, fused), axis=-1)  # (T, heads, Dh)
    return out


def rope_adjacent(x: Array, cos: Array, sin: Array, fused: bool = False) -> Array:
    """llama.cpp NORM rope: element 2i pairs with 2i+1. x: (T, heads, Dh). `fused`: as rope_half_split."""
    xe, xo = x[..., 0::2], x[..., 1::2]  # (T, heads, Dh/2) each
    c, s = cos[:, None, :], sin[:, None, :]  # (T, 1, Dh/2)
    out = np.empty_like(x)  # (T, heads, Dh)
    out[..., 0::2], out[..., 1::2] = _rotate(xe, xo, c, s, fused)
    return out


def f16_round(x: Array) -> Array:
    """x rounded to float16 (to nearest even, as ggml's FP32_TO_FP16 / F16C) and back to x's dtype."""
    out: Array = x.astype(np.float16).astype(x.dtype)
    return out


def silu(x: Array) -> Array:
    """x · sigmoid(x). float32 goes through ggml-cpu's own expf (apr.engine.ggml_math: ≤ 2 ulp, and
    llama.cpp's bits, which `--precision ggml` needs); other dtypes through numpy's exp."""
    if x.dtype == np.float32:
        return ggml_math.silu(x)
    out: Array = x / (1 + np.exp(-x))
    return out


# The whole-matrix attention steps below (hidden_keys … upper_zeroed) are the plain definitions; the decoder
# runs `causal_attention`, a block of queries at a time, which the tests check against them.
def hidden_keys(t: int, window: int = 0) -> Array:
    """(T, T) bool: True where query i may not see key j — the future, and with a sliding window of
    `window` keys, keys with i - j >= window (transformers' and llama.cpp's SWA rule)."""
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    hidden: Array = (j > i) | ((i - j >= window) if window else False)
    return hidden


def causal_softmax(scores: Array, window: int = 0) -> Array:
    """Softmax over the keys each query sees (j ≤ i, within the window); other entries exactly 0.
    scores: (H, T, T)."""
    future = hidden_keys(scores.shape[-1], window)  # (T, T)
    masked = np.where(future, -np.inf, scores)  # (H, T, T)
    e = np.exp(masked - masked.max(axis=-1, keepdims=True))  # (H, T, T)
    probs: Array = e / e.sum(axis=-1, keepdims=True)  # (H, T, T)
    return probs


def attention_scores(q: Array, k: Array, n_rep: int, scale: float = 0.0) -> Array:
    """Q·Kᵀ·scale per query head (scale 0: 1/sqrt(Dh)); GQA repeats each kv head n_rep times.
    q: (T,H,Dh), k: (T,Hkv,Dh)."""
    k_rep = np.repeat(k, n_rep, axis=1)  # (T, H, Dh)
    scale = q.dtype.type(scale or 1.0 / np.sqrt(q.shape[-1]))
    scores: Array = np.einsum("thd,shd->hts", q, k_rep, optimize=True) * scale  # (H, T, T)
    return scores


def attend(probs: Array, v: Array, n_rep: int) -> Array:
    """Σ_j p_ij · v_j per head, heads concatenated. probs: (H,T,T), v: (T,Hkv,Dh) → (T, H·Dh)."""
    v_rep = np.repeat(v, n_rep, axis=1)  # (T, H, Dh)
    out = np.einsum("hts,shd->thd", probs, v_rep, optimize=True)  # (T, H, Dh)
    flat: Array = out.reshape(out.shape[0], -1)  # (T, H·Dh)
    return flat


def upper_zeroed(scores: Array, window: int = 0) -> Array:
    """The (H, T, T) score tensor as aprender saves it: entries a query cannot see (above the diagonal,
    outside the window) set to 0.0."""
    return np.where(hidden_keys(scores.shape[-1], window), scores.dtype.type(0), scores)


def gelu_tanh(x: Array) -> Array:
    """GELU, tanh approximation (Gemma's gelu_pytorch_tanh)."""
    c = x.dtype.type(np.sqrt(2.0 / np.pi))
    out: Array = x.dtype.type(0.5) * x * (1 + np.tanh(c * (x + x.dtype.type(0.044715) * x**3)))
    return out


def softcap(x: Array, cap: float) -> Array:
    """cap · tanh(x / cap) (Gemma 2's attention and final logit soft-capping)."""
    c = x.dtype.type(cap)
    out: Array = np.tanh(x / c) * c
    return out


def softmax(x: Array) -> Array:
    """Softmax over the last axis (max-subtracted)."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))  # (..., N)
    out: Array = e / e.sum(axis=-1, keepdims=True)  # (..., N)
    return out


def sigmoid(x: Array) -> Array:
    out: Array = 1 / (1 + np.exp(-x))
    return out


def top_k(x: Array, k: int) -> npt.NDArray[np.int64]:
    """Indices of the k largest entries of each row, largest first; equal entries: lowest index first
    (a stable sort; torch.topk leaves the order of ties unspecified). x: (..., N) → (..., k)."""
    order: npt.NDArray[np.int64] = np.argsort(-x, axis=-1, kind="stable")[..., :k]
    return order


Each = Callable[[Callable[[int], None], Iterable[int]], None] | None
BLOCK_BYTES = 8 << 20  # one query block's (H, block, T) scores: a few MiB, whatever T is


@dataclass(frozen=True, slots=True)
class Attended:
    """`causal_attention`'s result: the output, and the (H, rows, T) scores/probs of the kept rows."""

    out: Array  # (T, H·Dh)
    scores: Array | None = None  # (H, R, T), hidden entries 0.0 (aprender's saved form)
    probs: Array | None = None  # (H, R, T)


def query_blocks(t: int, block: int) -> list[tuple[int, int]]:
    """[a, b) query blocks of about `block` rows covering 0..t, none of 1 row unless t is 1: numpy's
    einsum takes another summation path for a length-1 axis, and the bits must not depend on blocking."""
    block = max(2, block)
    starts = list(range(0, t, block))
    if len(starts) > 1 and t - starts[-1] == 1:
        starts.pop()
    return [(a, starts[n + 1] if n + 1 < len(starts) else t) for n, a in enumerate(starts)]


def causal_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    scale: float = 0.0,
    cap: float = 0.0,
    window: int = 0,
    keep_rows: npt.NDArray[np.intp] | None = None,
    each: Each = None,
    ggml_kv: str | None = None,
) -> Attended:
    """softmax(causal(cap(Q·Kᵀ·scale)))·V per query head (GQA: query head h reads kv head h // (H/Hkv)),
    a block of queries at a time: memory O(H · block · T), whatever is kept.

    A block computes scores and exp only for the keys up to its last query (the causal lower part) and
    pads with exact zeros where a reduction's order depends on the row length (the row sum, the product
    with V), so every number is the same, bit for bit, whatever the blocking and whatever is kept.
    `keep_rows` (sorted query positions) returns their scores (hidden entries 0.0, as aprender saves
    them) and probabilities as (H, R, T). `each(fn, blocks)` runs the blocks (Weights' threads).
    `ggml_kv` ("f32" / "f16": the KV cache's type) computes in ggml-cpu's float32 order instead (float32
    input only; `ggml_attention_parts`): bit for bit llama.cpp's non-flash attention.
    q: (T, H, Dh), k, v: (T, Hkv, Dh) → out (T, H·Dh)."""
    T, H, Dh = q.shape
    Hkv = k.shape[1]
    rep = H // Hkv
    kh = np.ascontiguousarray(k.transpose(1, 0, 2))  # (Hkv, T, Dh)
    vh = np.ascontiguousarray(v.transpose(1, 0, 2))  # (Hkv, T, Dh)
    scale_t = q.dtype.type(scale or 1.0 / np.sqrt(Dh))
    if ggml_kv is not None:  # llama.cpp: 1.0f / sqrtf(n_embd_head) in float32, or the model's own scale
        scale_t = np.float32(scale) if scale else np.float32(1) / np.sqrt(np.float32(Dh))
    out = np.empty((T, H, Dh), q.dtype)  # (T, H, Dh)
    rows = np.empty(0, np.intp) if keep_rows is None else np.asarray(keep_rows, np.intp)
    kept = None if keep_rows is None else (np.zeros((2, H, len(rows), T), q.dtype))  # scores, probs
    lanes = 1 if ggml_kv is None else GGML_LANE_WORK  # the ggml order's float64 lane temporaries
    bounds = query_blocks(T, BLOCK_BYTES // (H * T * q.dtype.itemsize * lanes))
    parts = None if ggml_kv is None else ggml_attention_parts(ggml_kv, T)

    def block(n: int) -> None:
        a, b = bounds[n]  # queries a..b see keys 0..b at most
        qg = q[a:b].transpose(1, 0, 2).reshape(Hkv, rep * (b - a), Dh)  # (Hkv, rep·n, Dh)
        kh_b = kh[:, :b]  # (Hkv, b, Dh)
        kq = qg @ kh_b.transpose(0, 2, 1) if parts is None else parts.scores(qg, kh_b)  # (Hkv, rep·n, b)
        s = kq.reshape(H, b - a, b) * scale_t  # (H, n, b)
        if cap:
            s = softcap(s, cap)
        i, j = np.arange(a, b)[:, None], np.arange(b)[None, :]
        hidden = (j > i) | ((i - j >= window) if window else False)  # (n, b)
        masked = np.where(hidden, -np.inf, s)  # (H, n, b)
        e = np.zeros((H, b - a, T), q.dtype)  # (H, n, T): exp of the keys no query here sees is 0
        if parts is None:
            np.exp(masked - masked.max(axis=-1, keepdims=True), out=e[:, :, :b])
            p = e / e.sum(axis=-1, keepdims=True)  # (H, n, T)
            o = p.reshape(Hkv, rep * (b - a), T) @ vh  # (Hkv, rep·n, Dh)
        else:
            e[:, :, :b] = np.where(
                hidden, np.float32(0), ggml_math.expf(masked - masked.max(-1, keepdims=True))
            )
            p = ggml_softmax_scale(e)  # (H, n, T)
            o = parts.values(p.reshape(Hkv, rep * (b - a), T), vh)  # (Hkv, rep·n, Dh)
        out[a:b] = o.reshape(H, b - a, Dh).transpose(1, 0, 2)  # (n, H, Dh)
        sel = np.flatnonzero((rows >= a) & (rows < b))
        if kept is not None and len(sel):
            local = rows[sel] - a
            kept[0][:, sel, :b] = np.where(hidden[local], q.dtype.type(0), s[:, local])
            kept[1][:, sel] = p[:, local]

    (each or _serial)(block, range(len(bounds)))
    return Attended(out.reshape(T, H * Dh), *(() if kept is None else (kept[0], kept[1])))


GGML_LANE_WORK = 64  # ggml-order attention: query blocks this many times smaller (its lane temporaries)


def _hsum8(acc: Array) -> Array:
    """hsum_float_8 / tinyBLAS hsum over the last axis (8): t = lo + hi, (t0 + t2) + (t1 + t3)."""
    t = acc[..., :4] + acc[..., 4:]
    out: Array = (t[..., 0] + t[..., 2]) + (t[..., 1] + t[..., 3])
    return out


def _padded(x: Array, multiple: int) -> Array:
    extra = -x.shape[-1] % multiple
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)]) if extra else x


def dot_tinyblas(x: Array, y: Array) -> Array:
    """x @ yᵀ over the last axis as llamafile's tinyBLAS (AVX2, float32 / f16 loads): element i in lane
    i % 8, fused multiply-adds in order, then hsum. x (..., M, K), y (..., N, K) → (..., M, N) float32;
    K is zero-padded to a multiple of 8 (zeros add nothing)."""
    xp, yp = _padded(x, 8), _padded(y, 8)
    acc = np.zeros((*x.shape[:-1], y.shape[-2], 8), np.float32)
    for i in range(0, xp.shape[-1], 8):
        acc = ggml_math.fma(xp[..., :, None, i : i + 8], yp[..., None, :, i : i + 8], acc)
    return _hsum8(acc)


def dot_vec_f32(x: Array, y: Array, pad: bool = False, f16: bool = False) -> Array:
    """x @ yᵀ over the last axis as ggml_vec_dot_f32 (ggml_vec_dot_f16 with `f16`; AVX2): 4 accumulators
    of 8 lanes over steps of 32 (element i in accumulator (i // 8) % 4, lane i % 8), reduced
    (a0 + a2) + (a1 + a3), then t = lo + hi and (t0 + t1) + (t2 + t3); the last K % 32 products added to
    that one by one, in float32 (in float64 for f16). `pad`: K is zero-padded to a multiple of 32 instead
    (a row ggml holds longer, with zeros). (..., M, N)."""
    if pad:
        x, y = _padded(x, 32), _padded(y, 32)
    k = x.shape[-1]
    whole = k - k % 32
    acc = np.zeros((*x.shape[:-1], y.shape[-2], 4, 8), np.float32)
    for i in range(0, whole, 32):
        xs = x[..., :, None, i : i + 32].reshape(*x.shape[:-1], 1, 4, 8)
        ys = y[..., None, :, i : i + 32].reshape(*y.shape[:-2], 1, y.shape[-2], 4, 8)
        acc = ggml_math.fma(xs, ys, acc)
    lanes = (acc[..., 0, :] + acc[..., 2, :]) + (acc[..., 1, :] + acc[..., 3, :])
    t = lanes[..., :4] + lanes[..., 4:]
    out: Array = (t[..., 0] + t[..., 1]) + (t[..., 2] + t[..., 3])
    if whole < k:
        total = out.astype(np.float64 if f16 else np.float32)
        for i in range(whole, k):
            total = total + (x[..., :, None, i] * y[..., None, :, i]).astype(total.dtype)
        out = total.astype(np.float32)
    return out


def ggml_softmax_scale(e: Array) -> Array:
    """ggml_vec_soft_max_f32's normalisation of exp values e (..., n), 0 where hidden: the f32 sum of
    each 8 keys (hsum) accumulated in float64, then e · (float)(1.0 / sum)."""
    groups = _padded(e, 8).reshape(*e.shape[:-1], -1, 8)
    total = np.cumsum(_hsum8(groups).astype(np.float64), axis=-1)[..., -1:]  # left to right
    out: Array = e * (1.0 / total).astype(np.float32)
    return out


@dataclass(frozen=True, slots=True)
class GgmlAttention:
    """Which kernels llama.cpp's non-flash attention runs for Q·Kᵀ and probs·V (ggml_compute_forward_
    mul_mat): Q is a permuted view, so an f32 cache multiplies with ggml_vec_dot_f32; an f16 cache
    converts Q (and the probs) to f16 first, contiguous, and tinyBLAS takes over when it can (≥ 2
    tokens, K a multiple of 8); probs·V reads contiguous probs: tinyBLAS from 2 tokens on."""

    kv: str
    tokens: int

    def scores(self, q: Array, k: Array) -> Array:
        """(Hkv, R, Dh) × (Hkv, b, Dh) → (Hkv, R, b)."""
        if self.kv == "f16" and self.tokens >= 2 and q.shape[-1] % 8 == 0:
            return dot_tinyblas(q, k)
        return dot_vec_f32(q, k, f16=self.kv == "f16")

    def values(self, p: Array, v: Array) -> Array:
        """probs (Hkv, R, T) × V (Hkv, T, Dh) → (Hkv, R, Dh); with an f16 V the probs rounded to f16."""
        if self.kv == "f16":
            p = f16_round(p)
        vt = np.ascontiguousarray(v.transpose(0, 2, 1))  # (Hkv, Dh, T)
        if self.tokens >= 2:
            return dot_tinyblas(p, vt)
        return dot_vec_f32(p, vt, pad=True, f16=self.kv == "f16")


def ggml_attention_parts(kv: str, tokens: int) -> GgmlAttention:
    if kv not in ("f32", "f16"):
        raise ValueError(f"unknown KV cache type {kv!r}")
    return GgmlAttention(kv, tokens)


def _serial(fn: Callable[[int], None], items: Iterable[int]) -> None:
    for item in items:
        fn(item)
