from __future__ import annotations

from pathlib import Path

import pytest

from apr.diff.compare import Tolerance, diff_traces
from apr.errors import MismatchError
from apr.stages import Stage, StageId
from apr.trace.reader import read_trace
from tests.fixtures.traces import write_trace

FAULT = StageId(Stage.FFN_UP, 2)


def test_identical_traces_have_no_divergence(tmp_path: Path) -> None:
    a, b = write_trace(tmp_path / "a"), write_trace(tmp_path / "b")
    d = diff_traces(read_trace(a), read_trace(b))
    assert d.first_divergence is None and d.diverged == []
    assert len(d.rows) == 1 + 4 * 17 + 2  # embedding, 17 per-layer dense stages w/o embedding, 2 whole-model
    assert all(r.metrics.max_abs == 0.0 for r in d.rows)


def test_injected_fault_is_the_first_divergence(tmp_path: Path) -> None:
    a, b = write_trace(tmp_path / "a"), write_trace(tmp_path / "b", fault=FAULT)
    d = diff_traces(read_trace(a), read_trace(b))
    assert d.first_divergence is not None and d.first_divergence.sid == FAULT
    ids = [r.sid for r in d.rows]
    assert ids == sorted(ids, key=lambda s: s.sort_key)
    assert all(r.passed for r in d.rows if r.sid.sort_key < FAULT.sort_key)


def test_tolerance_rules(tmp_path: Path) -> None:
    a = write_trace(tmp_path / "a")
    b = write_trace(tmp_path / "b", noise=1e-3)  # cosine ≈ 1 − 5e-7 everywhere
    ra, rb = read_trace(a), read_trace(b)
    assert diff_traces(ra, rb).first_divergence is None
    strict = diff_traces(ra, rb, Tolerance.from_options(None, 1e-4))
    assert strict.first_divergence is not None and strict.first_divergence.sid == StageId(Stage.EMBEDDING, 0)
    assert Tolerance.from_options(None, 1e-4).min_cos is None  # given thresholds replace the default rule


def test_only_in_one_side_is_listed(tmp_path: Path) -> None:
    a, b = write_trace(tmp_path / "a"), write_trace(tmp_path / "b")
    (b / "lm_head.bin").unlink()
    (b / "manifest.json").unlink()  # now read as a bare aprender layout
    d = diff_traces(read_trace(a), read_trace(b))
    assert d.only_in_a == [StageId(Stage.LM_HEAD)] and d.only_in_b == []


def test_different_token_ids_refuse(tmp_path: Path) -> None:
    a, b = write_trace(tmp_path / "a"), write_trace(tmp_path / "b", token_ids=(1, 2, 4))
    with pytest.raises(MismatchError, match=r"different token ids \(\[1, 2, 3\] vs \[1, 2, 4\]\)"):
        diff_traces(read_trace(a), read_trace(b))


def test_worst_coordinates_come_from_the_manifest_shape(tmp_path: Path) -> None:
    a, b = write_trace(tmp_path / "a"), write_trace(tmp_path / "b", fault=FAULT)
    first = diff_traces(read_trace(a), read_trace(b)).first_divergence
    assert first is not None and first.shape == (3, 12)
    coords = first.worst_coords
    assert coords is not None and set(coords) == {"seq", "ffn"}
    assert coords["seq"] * 12 + coords["ffn"] == first.metrics.max_index
