"""`--save-tensor-positions`: parsing, what a trace of some positions holds, diff refusing a mismatch;
`--progress`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from apr.errors import PlanError
from apr.stages import Stage, StageId
from apr.trace.plan import Positions, TracePlan
from apr.trace.reader import read_trace
from tests.fixtures.cli import run

IDS = "504,2365,6354,16438,27003,690,260"


@pytest.mark.parametrize(
    ("text", "n", "rows"),
    [
        ("all", 7, range(7)),
        ("last", 7, range(6, 7)),
        ("-16..", 7, range(7)),
        ("-3..", 7, range(4, 7)),
        ("2..5", 7, range(2, 5)),
        ("..2", 7, range(2)),
        ("1..-1", 7, range(1, 6)),
        (" 3 .. ", 9, range(3, 9)),
    ],
)
def test_positions_select_python_slices(text: str, n: int, rows: range) -> None:
    assert Positions.parse(text).select(n) == rows


def test_positions_errors_are_one_line() -> None:
    with pytest.raises(PlanError, match=r'^save-tensor positions invalid \("3-5"\): expected START\.\.END'):
        TracePlan.from_cli("all", "0..1", "3-5")
    with pytest.raises(
        PlanError, match="^--save-tensor-positions 5..5 selects no position of the 7-token prompt$"
    ):
        Positions.parse("5..5").select(7)


@pytest.mark.parametrize("text", ["0..-0", "+2..2", " 3..3 "])
def test_positions_are_echoed_as_given(text: str) -> None:
    """`-0` is 0, as in a Python slice: the message shows what the user wrote, not `0..0`."""
    with pytest.raises(PlanError) as e:
        Positions.parse(text).select(7)
    assert str(e.value) == f"--save-tensor-positions {text.strip()} selects no position of the 7-token prompt"
    assert Positions.parse(text) == Positions(*map(int, text.split("..")))


def _trace(model: Path, out: Path, *extra: str) -> None:
    code, _, stderr = run(
        "trace",
        str(model),
        "--tokens",
        IDS,
        "--save-tensor",
        "all",
        "--save-tensor-layers",
        "0..2",
        "--lm-head-all",
        "--save-tensor-dir",
        str(out),
        "-q",
        *extra,
    )
    assert (code, stderr) == (0, "")


def test_a_trace_of_some_positions_is_those_rows_of_the_full_trace(
    smollm2_gguf: Path, tmp_path: Path
) -> None:
    _trace(smollm2_gguf, tmp_path / "all")
    _trace(smollm2_gguf, tmp_path / "some", "--save-tensor-positions", "-3..-1")
    full, some = read_trace(tmp_path / "all"), read_trace(tmp_path / "some")
    assert some.manifest is not None and some.manifest.positions == "4..6"
    assert json.loads((tmp_path / "some" / "manifest.json").read_text())["plan"]["positions"] == "4..6"
    assert "positions" not in json.loads((tmp_path / "all" / "manifest.json").read_text())["plan"]
    assert set(full.entries) == set(some.entries)
    for sid in full.entries:
        x, y = full.load(sid), some.load(sid)
        want = x[:, 4:6] if sid.stage in (Stage.ATTN_SCORES, Stage.ATTN_SOFTMAX) else x[4:6]
        assert np.array_equal(y, want), sid
    assert some.load(StageId(Stage.ATTN_SOFTMAX, 1)).shape == (9, 2, 7)
    assert some.load(StageId(Stage.FFN_UP, 0)).shape == (2, 1536)
    code, _, stderr = run("diff", str(tmp_path / "all"), str(tmp_path / "some"))
    assert (code, stderr) == (
        5,
        "error: the traces saved different prompt positions (0..7 vs 4..6); "
        "trace both with the same --save-tensor-positions\n",
    )


def test_a_runtime_engines_full_matrices_are_cut_to_the_positions(smollm2_gguf: Path, tmp_path: Path) -> None:
    """llama.cpp hands over whole (H, T, T) matrices and (T, …) stages; the writer keeps the rows."""
    _trace(smollm2_gguf, tmp_path / "all", "--engine", "llama.cpp")
    _trace(smollm2_gguf, tmp_path / "some", "--engine", "llama.cpp", "--save-tensor-positions", "1..3")
    full, some = read_trace(tmp_path / "all"), read_trace(tmp_path / "some")
    assert set(full.entries) == set(some.entries) and StageId(Stage.ATTN_SCORES, 1) in some.entries
    for sid in full.entries:
        x = full.load(sid)
        want = x[:, 1:3] if sid.stage in (Stage.ATTN_SCORES, Stage.ATTN_SOFTMAX) else x[1:3]
        assert np.array_equal(some.load(sid), want), sid


def test_progress_on_request_and_never_with_quiet(smollm2_gguf: Path, tmp_path: Path) -> None:
    args = ["trace", str(smollm2_gguf), "--save-tensor", "lm_head", "--save-tensor-dir", str(tmp_path / "t")]
    code, _, stderr = run(*args, "--progress")
    assert code == 0 and stderr.startswith("\rlayer 1/30\rlayer 2/30") and stderr.endswith("\rlayer 30/30\n")
    assert run(*args, "--progress", "-q")[2] == "" and run(*args)[2] == ""


def test_payload_progress_on_request(tmp_path: Path) -> None:
    from tests.runtimes import write_tiny_gguf

    model = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    code, _, stderr = run("trace", str(model), "--payload", "--progress")
    assert (code, stderr) == (0, "\rlayer 1/2\rlayer 2/2\n")
