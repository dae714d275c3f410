"""The bounded fuzz run of `make test` (the long campaign is `make fuzz`), and the kept regressions.

Every reader gets `INPUTS` structure-aware mutations of its seed; each must be accepted or refused with a
one-line AprError, within the harness's time limit. Every input an earlier campaign found escaping is kept
under tests/fuzz/regressions/ and must now end cleanly.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from apr.errors import FormatError
from tests.fuzz import harness
from tests.fuzz.harness import ACCEPTED, CLEAN, TARGETS, Target, classify, regressions, replay, run_campaign

INPUTS = 3000  # per reader: about a minute for all six (on tmpfs)


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="apr-fuzz-", dir=harness.SCRATCH) as tmp:
        yield Path(tmp)


@pytest.mark.parametrize("name", list(TARGETS))
def test_seed_is_accepted(name: str, root: Path) -> None:
    seed = harness.seeds(root / "seeds")[name]
    assert classify(TARGETS[name], seed) == ACCEPTED


@pytest.mark.parametrize("name", list(TARGETS))
def test_bounded_fuzz(name: str, root: Path) -> None:
    s = run_campaign(name, INPUTS, root)
    assert s.inputs == INPUTS
    assert s.clean_errors > INPUTS // 10, "the mutators no longer reach the reader's checks"
    assert (s.escapes, s.hangs) == ({}, 0)


def test_escapes_are_counted(tmp_path: Path) -> None:
    """The harness can fail: a reader that leaks a ValueError, a multi-line error or a hang is caught."""

    def leaky(path: Path) -> None:
        raise ValueError("boom")

    def two_lines(path: Path) -> None:
        raise FormatError("one\ntwo")

    assert classify(Target("x", (), leaky), tmp_path).startswith("ValueError at ")
    assert classify(Target("x", (), two_lines), tmp_path) == "multi-line FormatError"
    assert classify(Target("x", (), lambda p: (_ for _ in ()).throw(FormatError("ok"))), tmp_path) == CLEAN


def test_a_hang_is_cut(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setattr(harness, "TIME_LIMIT", 1)
    assert classify(Target("x", (), lambda p: time.sleep(5)), tmp_path) == harness.HANG


KEPT = regressions()


def test_regressions_are_kept() -> None:
    assert len(KEPT) >= 1 and all(p.stat().st_size < 64 << 10 for _, _, p in KEPT)


@pytest.mark.parametrize(("name", "rel", "path"), KEPT, ids=[str(p.parent.name) for _, _, p in KEPT])
def test_regression(name: str, rel: str, path: Path, root: Path) -> None:
    assert replay(name, rel, path.read_bytes(), root) in (ACCEPTED, CLEAN)
