"""The engine's numpy ops: RoPE pairings agree under the Q/K permutation; softmax is causal; RMSNorm."""

from __future__ import annotations

import numpy as np

from apr.engine import ops, rope
from apr.formats.config import hf_to_interleaved, interleaved_to_hf
from apr.models.config import RopeScaling


def angles(t: int, dh: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    freqs, mult = rope.inv_freq(RopeScaling(), dh, theta)
    return rope.angles(np.arange(t), freqs, mult, np.float64)


rng = np.random.default_rng(0)


def test_adjacent_rope_on_interleaved_rows_equals_half_split_rope_on_hf_rows() -> None:
    T, H, Dh = 5, 3, 8
    q_hf = rng.standard_normal((T, H * Dh))
    cos, sin = angles(T, Dh, 10000.0)
    hf = ops.rope_half_split(q_hf.reshape(T, H, Dh), cos, sin).reshape(T, H * Dh)
    inter = ops.rope_adjacent(hf_to_interleaved(q_hf, H).reshape(T, H, Dh), cos, sin).reshape(T, H * Dh)
    np.testing.assert_allclose(interleaved_to_hf(inter, H), hf, rtol=0, atol=1e-12)


def test_rope_at_position_zero_is_identity_and_preserves_norm() -> None:
    x = rng.standard_normal((4, 2, 6))
    cos, sin = angles(4, 6, 500.0)
    y = ops.rope_half_split(x, cos, sin)
    assert np.array_equal(y[0], x[0])
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12)


def test_causal_softmax_and_scores() -> None:
    q, k = rng.standard_normal((4, 2, 8)), rng.standard_normal((4, 1, 8))
    scores = ops.attention_scores(q, k, n_rep=2)  # GQA: one kv head serves both query heads
    assert scores.shape == (2, 4, 4)
    np.testing.assert_allclose(scores[1, 2, 1], q[2, 1] @ k[1, 0] / np.sqrt(8))
    p = ops.causal_softmax(scores)
    assert np.all(np.triu(p, 1) == 0) and np.allclose(p.sum(-1), 1)
    assert p[0, 0, 0] == 1.0
    assert np.all(np.triu(ops.upper_zeroed(scores), 1) == 0) and np.array_equal(
        np.tril(scores), np.tril(ops.upper_zeroed(scores))
    )


def test_rms_norm_and_silu() -> None:
    x, w = rng.standard_normal((3, 16)), rng.standard_normal(16)
    expected = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(ops.rms_norm(x, w, 1e-6), expected, rtol=1e-14)
    np.testing.assert_allclose(ops.silu(np.array([0.0, 1.0])), [0.0, 1 / (1 + np.exp(-1.0))])
