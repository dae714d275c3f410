"""`apr diff` on statistics traces: two stats traces, and a stats trace against a full one (whose statistics
are computed from its stage files). The oracle for the numbers: scaling a weight by 1.01 scales its matmul's
output, so the stage's L2, mean and std change by exactly 1 % of A's (rel_l2 = 0.01/1.01 against B)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures import zoo
from tests.fixtures.cli import run
from tests.fixtures.gguf_edit import scale_tensor as scaled
from tests.fixtures.models import cache_dir

IDS = "1,5,49,93,137,181,225,269"


@pytest.fixture(scope="module")
def llama() -> Path:
    return zoo.build("llama", cache_dir() / "fixtures").gguf


def trace(model: Path, out: Path, mode: str) -> Path:
    args = ("--save-tensor", "all", "--save-tensor-layers", "all", "--save-tensor-mode", mode)
    code, stdout, err = run("-q", "trace", str(model), *args, "--tokens", IDS, "--save-tensor-dir", str(out))
    assert code == 0, stdout + err
    return out


@pytest.fixture(scope="module")
def traces(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sd")
    bad = scaled(llama, d / "bad.gguf", "blk.1.ffn_gate.weight", 1.01)
    return {
        "stats": trace(llama, d / "stats", "stats"),
        "full": trace(llama, d / "full", "full"),
        "bad": trace(bad, d / "bad", "stats"),
        "bad_full": trace(bad, d / "bad_full", "full"),
    }


@pytest.mark.parametrize(("a", "b"), [("stats", "stats"), ("stats", "full"), ("full", "stats")])
def test_the_same_run_is_identical_in_every_stage(traces: dict[str, Path], a: str, b: str) -> None:
    code, out, err = run("diff", str(traces[a]), str(traces[b]), "--check", "--json")
    doc = json.loads(out)
    assert code == 0, err
    assert doc["modes"] == [a, b] and doc["first_divergence"] is None
    assert len(doc["rows"]) == 35 and all(r["identical"] for r in doc["rows"])  # 2 × 16 + 3


@pytest.mark.parametrize("b", ["bad", "bad_full"])
def test_a_scaled_weight_is_the_first_divergence(traces: dict[str, Path], b: str) -> None:
    code, out, _ = run("diff", str(traces[b]), str(traces["stats"]), "--check", "--json", "--max-rel", "1e-3")
    doc = json.loads(out)
    assert code == 1
    assert doc["first_divergence"] == "blk.1.ffn_gate"
    rows = {r["id"]: r for r in doc["rows"]}
    assert all(rows[k]["identical"] for k in list(rows)[: list(rows).index("blk.1.ffn_gate")])
    gate = rows["blk.1.ffn_gate"]
    # A = scaled: ‖1.01·b‖ − ‖b‖ over ‖b‖ = 0.01 exactly (f32 rounding of the products: 1e-6)
    assert gate["rel_l2"] == pytest.approx(0.01, abs=1e-6)
    assert gate["bound"] == pytest.approx(0.01, abs=1e-6)
    assert gate["rel_absmax"] == pytest.approx(0.01, abs=1e-6)
    assert gate["same_hash"] == 0 and gate["positions"] == 8


def test_default_rule_is_the_cosine_rules_error(traces: dict[str, Path]) -> None:
    """No --max-rel: a stage diverges above √(2·(1 − 0.999)) = 0.0447, so a 1 % change passes; text form."""
    code, out, _ = run("diff", str(traces["bad"]), str(traces["stats"]), "--check")
    assert code == 0, out
    assert "statistics bound > 0.04472" in out
    assert "No divergence under this rule." in out
    assert "blk.1.ffn_gate" in out


def test_different_token_ids_are_refused(llama: Path, traces: dict[str, Path], tmp_path: Path) -> None:
    code, _, err = run("-q", "trace", str(llama), "--save-tensor", "all", "--tokens", "1,5",
                       "--save-tensor-dir", str(tmp_path / "o"), "--save-tensor-mode", "stats")  # fmt: skip
    assert code == 0
    code, _, err = run("diff", str(tmp_path / "o"), str(traces["stats"]))
    assert code != 0 and "different token ids" in err and err.count("\n") == 1


def test_different_positions_compare_the_common_ones_and_say_so(
    llama: Path, traces: dict[str, Path], tmp_path: Path
) -> None:
    """A full trace of the last 3 positions against a stats trace of all 8: rows over the 3 both hold, and
    a note naming both sides' positions (text and JSON)."""
    args = ("--save-tensor", "all", "--save-tensor-layers", "all", "--save-tensor-positions", "-3..")
    code, out, err = run(
        "-q", "trace", str(llama), *args, "--tokens", IDS, "--save-tensor-dir", str(tmp_path / "t")
    )
    assert code == 0, out + err
    code, out, err = run("diff", str(traces["stats"]), str(tmp_path / "t"), "--json")
    doc = json.loads(out)
    assert code == 0, err
    assert {r["positions"] for r in doc["rows"]} == {3, 1}  # lm_head holds the last position only
    assert any("(A 0..8, B 5..8)" in n for n in doc["notes"]), doc["notes"]
    code, out, _ = run("diff", str(traces["stats"]), str(tmp_path / "t"))
    assert code == 0 and "note: the traces saved different prompt positions (A 0..8, B 5..8)" in out
