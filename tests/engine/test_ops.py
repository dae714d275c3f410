"""The engine's numpy ops: RoPE pairings agree under the Q/K permutation; softmax is causal; RMSNorm."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

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


def _qkv(t: int, h: int, hkv: int, dh: int, dtype: type = np.float32) -> tuple[np.ndarray, ...]:
    return tuple(rng.standard_normal((t, n, dh)).astype(dtype) for n in (h, hkv, hkv))


def _threaded(fn: Callable[[int], None], items: Iterable[int]) -> None:
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(fn, list(items)))


@pytest.mark.parametrize(
    ("t", "cap", "window", "dtype"),
    [(7, 0.0, 0, np.float32), (150, 0.0, 0, np.float32), (97, 30.0, 9, np.float64)],
)
def test_blocked_causal_attention_is_the_whole_matrix_math(
    t: int, cap: float, window: int, dtype: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    q, k, v = _qkv(t, 4, 2, 8, dtype)
    scores = ops.attention_scores(q, k, 2)
    scores = ops.softcap(scores, cap) if cap else scores
    probs = ops.causal_softmax(scores, window)
    monkeypatch.setattr(ops, "BLOCK_BYTES", 16 * 4 * t * q.dtype.itemsize)  # blocks of 16 queries
    got = ops.causal_attention(q, k, v, cap=cap, window=window, keep_rows=np.arange(t))
    tol = 1e-6 if dtype is np.float32 else 1e-14
    np.testing.assert_allclose(got.out, ops.attend(probs, v, 2), rtol=0, atol=tol)
    np.testing.assert_allclose(got.probs, probs, rtol=0, atol=tol)
    np.testing.assert_allclose(got.scores, ops.upper_zeroed(scores, window), rtol=0, atol=tol * 10)
    assert np.all(got.scores[ops.hidden_keys(t, window)[None].repeat(4, 0)] == 0)


def test_causal_attention_bits_do_not_depend_on_what_is_kept_or_on_threads() -> None:
    q, k, v = _qkv(300, 6, 2, 16)
    full = ops.causal_attention(q, k, v, keep_rows=np.arange(300))
    none = ops.causal_attention(q, k, v, each=_threaded)
    rows = np.array([0, 5, 150, 298, 299])
    some = ops.causal_attention(q, k, v, keep_rows=rows, each=_threaded)
    assert none.scores is None and none.probs is None
    assert np.array_equal(full.out, none.out) and np.array_equal(full.out, some.out)
    assert some.scores is not None and some.probs is not None and full.scores is not None
    assert some.scores.shape == (6, 5, 300)
    assert np.array_equal(some.scores, full.scores[:, rows]) and np.array_equal(
        some.probs, full.probs[:, rows]
    )


def test_query_blocks_cover_the_prompt_with_no_one_row_block() -> None:
    assert ops.query_blocks(1, 64) == [(0, 1)]
    assert ops.query_blocks(5, 1) == [(0, 2), (2, 5)]
    assert ops.query_blocks(129, 64) == [(0, 64), (64, 129)]
    assert ops.query_blocks(130, 64) == [(0, 64), (64, 128), (128, 130)]
