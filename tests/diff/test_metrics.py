from __future__ import annotations

import math

import numpy as np

from apr.diff.metrics import compare, first_max, top_diffs


def f32(*xs: float) -> np.ndarray:
    return np.array(xs, np.float32)


def test_identical_inputs() -> None:
    m = compare(f32(1, 2, 3), f32(1, 2, 3))
    assert (m.max_abs, m.rms, m.cosine, m.max_index) == (0.0, 0.0, 1.0, 0)
    assert m.rel_l2 == 0.0 and m.sqnr_db == math.inf


def test_spec_vector_max_and_rms() -> None:
    m = compare(f32(1, 2, 3, 4), f32(1, 2.5, 3, 4))
    assert (m.max_abs, m.max_index, m.rms) == (0.5, 1, 0.25)
    assert (m.a_at_max, m.b_at_max) == (2.0, 2.5)


def test_spec_vector_top3() -> None:
    top = top_diffs(np.zeros(5, np.float32), f32(0.1, 0.5, -0.3, 0.05, 0.2), 3)
    assert [t.index for t in top] == [1, 2, 4]


def test_first_maximum_wins_and_nan_never_wins() -> None:
    assert first_max(f32(0.5, 1.0, 1.0)) == (1.0, 1)
    assert first_max(f32(math.nan, 0.25, math.nan)) == (0.25, 1)
    assert first_max(f32(math.nan)) == (0.0, 0)
    assert first_max(f32()) == (0.0, 0)


def test_cosine_is_zero_when_a_norm_is_zero_and_nan_propagates() -> None:
    assert compare(f32(0, 0), f32(1, 2)).cosine == 0.0
    m = compare(f32(1, math.nan), f32(1, 2))
    assert math.isnan(m.cosine) and math.isnan(m.rms) and m.nan_count == 1


def test_relative_error_and_sqnr() -> None:
    m = compare(f32(1.1, 0), f32(1, 0))
    assert math.isclose(m.rel_l2, 0.1, rel_tol=1e-6)
    assert math.isclose(m.sqnr_db, 20.0, rel_tol=1e-5)


def test_top_ranks_nan_first_then_descending_stable() -> None:
    top = top_diffs(f32(0, 0, 0, 0), f32(1, math.nan, 1, 2), 10)
    assert [t.index for t in top] == [1, 3, 0, 2]


def test_empty_inputs() -> None:
    m = compare(f32(), f32())
    assert (m.n, m.max_abs, m.rms, m.cosine) == (0, 0.0, 0.0, 0.0)
    assert top_diffs(f32(), f32(), 5) == []
