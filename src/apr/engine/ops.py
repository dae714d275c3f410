"""Pure numpy building blocks of the decoder forward pass. No I/O, no state, no knowledge of stages.

Legend: T tokens, D hidden, H query heads, Hkv key/value heads, Dh head dim, I ffn width.
Every function keeps its input dtype (f32 by default, f64 for the high-precision reference).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]


def rms_norm(x: Array, w: Array, eps: float) -> Array:
    """x / sqrt(mean(x²) + eps) · w over the last axis."""
    ms = np.mean(np.square(x), axis=-1, keepdims=True)  # (..., 1)
    out: Array = x / np.sqrt(ms + x.dtype.type(eps)) * w  # (..., D)
    return out


def rope_angles(positions: Array, head_dim: int, theta: float, dtype: Any) -> tuple[Array, Array]:
    """cos, sin of pos·θ^(−2i/Dh) for i < Dh/2, computed in f64 then cast."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (Dh/2,)
    ang = positions.astype(np.float64)[:, None] * inv_freq[None, :]  # (T, Dh/2)
    return np.cos(ang).astype(dtype), np.sin(ang).astype(dtype)


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


def causal_softmax(scores: Array) -> Array:
    """Softmax over keys j ≤ i for each query i; entries j > i are exactly 0. scores: (H, T, T)."""
    t = scores.shape[-1]
    future = np.triu(np.ones((t, t), dtype=bool), k=1)  # (T, T)
    masked = np.where(future, -np.inf, scores)  # (H, T, T)
    e = np.exp(masked - masked.max(axis=-1, keepdims=True))  # (H, T, T)
    probs: Array = e / e.sum(axis=-1, keepdims=True)  # (H, T, T)
    return probs


def attention_scores(q: Array, k: Array, n_rep: int) -> Array:
    """Q·Kᵀ/sqrt(Dh) per query head; GQA repeats each kv head n_rep times. q: (T,H,Dh), k: (T,Hkv,Dh)."""
    k_rep = np.repeat(k, n_rep, axis=1)  # (T, H, Dh)
    scale = q.dtype.type(1.0 / np.sqrt(q.shape[-1]))
    scores: Array = np.einsum("thd,shd->hts", q, k_rep, optimize=True) * scale  # (H, T, T)
    return scores


def attend(probs: Array, v: Array, n_rep: int) -> Array:
    """Σ_j p_ij · v_j per head, heads concatenated. probs: (H,T,T), v: (T,Hkv,Dh) → (T, H·Dh)."""
    v_rep = np.repeat(v, n_rep, axis=1)  # (T, H, Dh)
    out = np.einsum("hts,shd->thd", probs, v_rep, optimize=True)  # (T, H, Dh)
    flat: Array = out.reshape(out.shape[0], -1)  # (T, H·Dh)
    return flat


def upper_zeroed(scores: Array) -> Array:
    """The (H, T, T) score tensor as aprender saves it: entries above the diagonal set to 0.0."""
    t = scores.shape[-1]
    return np.where(np.triu(np.ones((t, t), dtype=bool), k=1), scores.dtype.type(0), scores)
