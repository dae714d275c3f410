"""Q/K row layouts: llama.cpp's per-head interleaving and its inverse (oracles.md §1)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from apr.formats.config import QKLayout, hf_to_interleaved, interleaved_to_hf
from apr.models.config import ModelConfig


def test_interleaved_to_hf_is_the_oracles_reshape_swap() -> None:
    w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(3 * 8, 5)  # 3 heads of head_dim 8, 5 columns
    expected = w.reshape(3, 4, 2, 5).swapaxes(1, 2).reshape(24, 5)  # w.reshape(n_head, hd//2, 2, ...)
    assert np.array_equal(interleaved_to_hf(w, 3, axis=0), expected)
    assert np.array_equal(interleaved_to_hf(w.T, 3).T, expected)  # activations: along the last axis


@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3))
def test_round_trip(heads: int, half: int, rows: int) -> None:
    x = np.random.default_rng(heads * 100 + half).standard_normal((rows, heads * 2 * half))
    assert np.array_equal(hf_to_interleaved(interleaved_to_hf(x, heads), heads), x)
    assert np.array_equal(interleaved_to_hf(hf_to_interleaved(x, heads), heads), x)


def test_layout_rope_pairing_and_config_dict_round_trip() -> None:
    assert (QKLayout.HF.rope_pairing, QKLayout.INTERLEAVED.rope_pairing) == ("half-split", "adjacent")
    cfg = ModelConfig("llama", 8, 2, 2, 1, 4, 16, 32, qk_layout=QKLayout.INTERLEAVED)
    assert ModelConfig.from_dict(cfg.to_dict() | {"unknown_key": 1}) == cfg
