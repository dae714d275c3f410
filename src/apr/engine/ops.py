"""Pure numpy building blocks of the decoder forward pass. No I/O, no state, no knowledge of stages.

Legend: T tokens, D hidden, H query heads, Hkv key/value heads, Dh head dim, I ffn width.
Every function keeps its input dtype (f32 by default, f64 for the high-precision reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]


def rms_norm(x: Array, w: Array, eps: float) -> Array:
    """x / sqrt(mean(x²) + eps) · w over the last axis."""
    ms = np.mean(np.square(x), axis=-1, keepdims=True)  # (..., 1)
    out: Array = x / np.sqrt(ms + x.dtype.type(eps)) * w  # (..., D)
    return out


def rope_half_split(x: Array, cos: Array, sin: Array) -> Array:
    """HF rotate_half (NEOX): element i pairs with i + Dh/2. x: (T, heads, Dh)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # (T, heads, Dh/2) each
    c, s = cos[:, None, :], sin[:, None, :]  # (T, 1, Dh/2)
    out: Array = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)  # (T, heads, Dh)
    return out


def rope_adjacent(x: Array, cos: Array, sin: Array) -> Array:
    """llama.cpp NORM rope: element 2i pairs with 2i+1. x: (T, heads, Dh)."""
    xe, xo = x[..., 0::2], x[..., 1::2]  # (T, heads, Dh/2) each
    c, s = cos[:, None, :], sin[:, None, :]  # (T, 1, Dh/2)
    out = np.empty_like(x)  # (T, heads, Dh)
    out[..., 0::2] = xe * c - xo * s
    out[..., 1::2] = xo * c + xe * s
    return out


def silu(x: Array) -> Array:
    out: Array = x / (1 + np.exp(-x))
    return out


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


BLOCK_BYTES = 8 << 20  # one query block's (H, block, T) scores: a few MiB, whatever T is


@dataclass(frozen=True, slots=True)
class Attended:
    """`causal_attention`'s result: the output, and the (H, rows, T) scores/probs of the kept rows."""

    out: Array  # (T, H·Dh)
    scores: Array | None = None  # (H, R, T), hidden entries 0.0 (aprender's saved form)
    probs: Array | None = None  # (H, R, T)


def causal_attention(
    q: Array,
    k: Array,
    v: Array,
    n_rep: int,
    *,
    scale: float = 0.0,
    cap: float = 0.0,
    window: int = 0,
    keep_rows: npt.NDArray[np.intp] | None = None,
) -> Attended:
    """softmax(causal(cap(Q·Kᵀ·scale)))·V, a block of queries at a time: memory O(H · block · T).

    The same numbers, bit for bit, as `attend(causal_softmax(softcap(attention_scores(…))))` on the
    whole (H, T, T) matrix: a block computes scores and exp only for the keys up to its last query (the
    causal lower part), and pads with exact zeros where a reduction's order depends on the row length
    (the row sum and the contraction with V). `keep_rows` (sorted query positions) returns their scores
    (hidden entries 0.0, as aprender saves them) and probabilities as (H, R, T).
    q: (T, H, Dh), k, v: (T, Hkv, Dh)."""
    T, H, Dh = q.shape
    k_rep = np.repeat(k, n_rep, axis=1)  # (T, H, Dh)
    v_rep = np.repeat(v, n_rep, axis=1)  # (T, H, Dh)
    scale_t = q.dtype.type(scale or 1.0 / np.sqrt(Dh))
    out = np.empty((T, H, Dh), q.dtype)  # (T, H, Dh)
    rows = np.empty(0, np.intp) if keep_rows is None else np.asarray(keep_rows, np.intp)
    kept_s = np.zeros((H, len(rows), T), q.dtype) if keep_rows is not None else None  # (H, R, T)
    kept_p = np.zeros((H, len(rows), T), q.dtype) if keep_rows is not None else None  # (H, R, T)
    block = max(1, min(T, BLOCK_BYTES // max(1, H * T * q.dtype.itemsize)))
    padded = np.zeros((H, block, T), q.dtype)  # (H, block, T): exp beyond the block's keys stays 0
    for a in range(0, T, block):
        b = min(T, a + block)  # queries a..b see keys 0..b at most
        s = np.einsum("thd,shd->hts", q[a:b], k_rep[:b], optimize=True) * scale_t  # (H, n, b)
        if cap:
            s = softcap(s, cap)
        i, j = np.arange(a, b)[:, None], np.arange(b)[None, :]
        hidden = (j > i) | ((i - j >= window) if window else False)  # (n, b)
        masked = np.where(hidden, -np.inf, s)  # (H, n, b)
        e = padded[:, : b - a]  # (H, n, T)
        np.exp(masked - masked.max(axis=-1, keepdims=True), out=e[:, :, :b])
        p = e / e.sum(axis=-1, keepdims=True)  # (H, n, T)
        out[a:b] = np.einsum("hts,shd->thd", p, v_rep, optimize=True)  # (n, H, Dh)
        sel = np.flatnonzero((rows >= a) & (rows < b))
        if kept_s is not None and kept_p is not None and len(sel):
            local = rows[sel] - a
            kept_s[:, sel, :b] = np.where(hidden[local], q.dtype.type(0), s[:, local])
            kept_p[:, sel] = p[:, local]
    return Attended(out.reshape(T, H * Dh), kept_s, kept_p)
