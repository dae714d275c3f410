"""`apr diff` end to end through the CLI: exit codes, JSON schemas, one-line errors for bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from apr.stages import Stage, StageId
from apr.trace import format as aprt
from tests.fixtures.cli import run, run_unprivileged
from tests.fixtures.traces import write_stages, write_trace

SPEC_KEYS = [
    "schema", "path_a", "path_b", "layer", "dim_product", "max_abs_diff", "max_abs_diff_index",
    "rms_diff", "cosine_sim", "top_diffs",
]  # fmt: skip


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    aprt.write_aprt(a, 0, np.array([1, 2, 3, 4], np.float32))
    aprt.write_aprt(b, 0, np.array([1, 2.5, 3, 4], np.float32))
    return a, b


def test_two_files_text_box(pair: tuple[Path, Path]) -> None:
    code, out, _ = run("diff", str(pair[0]), str(pair[1]), "--values", "--limit", "2")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "╔" + "═" * 78 + "╗" and lines[-1] == "╚" + "═" * 78 + "╝"
    assert "║ max|diff|:   5.000000e-1 (at index 1)" in out
    assert "║ RMS diff:    2.500000e-1" in out
    assert "║   [       1] a=  +2.000000e0  b=  +2.500000e0  |Δ|=5.000000e-1" in out
    assert all(len(line) == 80 for line in lines)


def test_two_files_json_has_exactly_the_spec_keys(pair: tuple[Path, Path]) -> None:
    code, out, _ = run("diff", str(pair[0]), str(pair[1]), "--values", "--json", "--limit", "1")
    doc = json.loads(out)
    assert code == 0 and list(doc) == SPEC_KEYS
    assert doc["schema"] == "apr-stage-diff-v1" and doc["layer"] == 0 and doc["dim_product"] == 4
    assert doc["top_diffs"] == [{"index": 1, "a": 2.0, "b": 2.5, "abs_diff": 0.5}]


def test_global_json_flag_and_whole_model_layer(tmp_path: Path) -> None:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    for p in (a, b):
        aprt.write_aprt(p, None, np.zeros(3, np.float32))
    code, out, _ = run("--json", "diff", str(a), str(b), "--values")
    doc = json.loads(out)
    assert code == 0 and doc["layer"] == "whole-model" and doc["cosine_sim"] == 0.0


def test_check_exit_codes_on_files(pair: tuple[Path, Path]) -> None:
    assert run("diff", str(pair[0]), str(pair[1]), "--values", "--check")[0] == 1
    assert run("diff", str(pair[0]), str(pair[0]), "--values", "--check")[0] == 0
    assert run("diff", str(pair[0]), str(pair[1]), "--values")[0] == 0  # like aprender without --check


def test_size_and_layer_mismatch_exit_5(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    c, d = tmp_path / "c.bin", tmp_path / "d.bin"
    aprt.write_aprt(c, 0, np.zeros(3, np.float32))
    aprt.write_aprt(d, 7, np.zeros(4, np.float32))
    code, out, err = run("diff", str(pair[0]), str(c), "--values")
    assert (code, out) == (5, "")
    assert err == (
        f"error: APRT dim_product mismatch: {pair[0]} has 4 f32s, {c} has 3 f32s — "
        "cannot compare stage tensors of different sizes\n"
    )
    code, _, err = run("diff", str(pair[0]), str(d), "--values")
    assert code == 5
    assert err == (
        f"error: APRT layer mismatch: {pair[0]} is layer 0, {d} is layer 7 — "
        "stages from different layers cannot be compared element-wise\n"
    )


@pytest.mark.parametrize(
    ("content", "code", "message"),
    [
        (b"", 4, "save-tensor header truncated: got 0 bytes, need 12"),
        (b"APRT\0\0\0\0\4\0\0", 4, "save-tensor header truncated: got 11 bytes, need 12"),
        (b"GGUF" + bytes(12), 4, 'save-tensor magic mismatch: got "GGUF" (47 47 55 46), expected "APRT"'),
        (b"APRT\0\0\0\0\xff\0\0\0" + bytes(8), 4,
         "save-tensor body truncated: header says 255 f32 values (1020 bytes), "
         "file has 8 bytes after the header"),
    ],
)  # fmt: skip
def test_malformed_files_give_one_line_and_exit_code(
    tmp_path: Path, pair: tuple[Path, Path], content: bytes, code: int, message: str
) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(content)
    got, out, err = run("diff", str(pair[0]), str(bad), "--values")
    assert (got, out, err) == (code, "", f"error: {bad}: {message}\n")


def test_missing_file_exit_3(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    missing = tmp_path / "missing.bin"
    assert run("diff", str(pair[0]), str(missing), "--values") == (
        3,
        "",
        f"error: File not found: {missing}\n",
    )


def test_directory_where_a_file_is_expected_exit_5(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    code, _, err = run("diff", str(pair[0]), str(d), "--values")
    assert code == 5 and err == f"error: cannot compare a file ({pair[0]}) with a directory ({d})\n"


def test_unreadable_file_exit_7(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    """A real permission failure: as root, the CLI runs without CAP_DAC_OVERRIDE (setpriv)."""
    bad = tmp_path / "locked.bin"
    bad.write_bytes(pair[0].read_bytes())
    bad.chmod(0)
    assert run_unprivileged("diff", str(pair[0]), str(bad), "--values") == (
        7,
        "",
        f"error: cannot read {bad}: Permission denied\n",
    )


def test_trace_directories_table_json_and_check(tmp_path: Path) -> None:
    fault = StageId(Stage.FFN_UP, 2)
    a, b = write_trace(tmp_path / "a"), write_trace(tmp_path / "b", fault=fault)
    code, out, _ = run("diff", str(a), str(b), "--values")
    assert code == 0
    marked = [line for line in out.splitlines() if line.startswith(">>")]
    assert len(marked) == 1 and marked[0].split()[1:3] == ["2", "ffn_up"]
    assert "First divergence: blk.2.ffn_up" in out
    code, out, _ = run("diff", str(a), str(b), "--values", "--json", "--check")
    doc = json.loads(out)
    assert code == 1 and doc["schema"] == "apr-trace-diff-v1"
    assert (doc["first_divergence"]["layer"], doc["first_divergence"]["stage"]) == (2, "ffn_up")
    assert [s["id"] for s in doc["stages"]][:2] == ["blk.0.embedding", "blk.0.attn_norm"]
    code, out, _ = run("diff", str(a), str(a), "--values", "--json", "--check")
    assert code == 0 and json.loads(out)["first_divergence"] is None


def test_min_cos_changes_the_rule(tmp_path: Path) -> None:
    a, b = write_trace(tmp_path / "a"), write_trace(tmp_path / "b", noise=1e-2)
    assert run("diff", str(a), str(b), "--values", "--check")[0] == 0
    code, out, _ = run("diff", str(a), str(b), "--values", "--check", "--min-cos", "0.99999999")
    assert code == 1 and "rule: a stage diverges when cosine < 0.99999999" in out


def test_two_empty_directories_are_not_traces_exit_5(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    message = f"error: neither side is a trace: {a} is an empty directory; {b} is an empty directory\n"
    assert run("diff", str(a), str(b), "--values", "--check") == (5, "", message)
    assert run("diff", str(a), str(b), "--values") == (5, "", message)  # a report of nothing, too


def test_a_trace_against_a_model_folder_names_the_folder(tmp_path: Path) -> None:
    model = tmp_path / "model-hf"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")  # what the safetensors format sniffs a folder by
    trace = write_trace(tmp_path / "t")
    assert run("diff", str(trace), str(model), "--check") == (
        5,
        "",
        f"error: {model} is not a trace: it is a safetensors model folder (`apr trace` it first)\n",
    )


def test_a_folder_of_other_files_says_what_it_holds_in_json_too(tmp_path: Path) -> None:
    other = tmp_path / "other"
    (other / "sub").mkdir(parents=True)
    for name in ("notes.txt", "a.bin", "c.json"):
        (other / name).write_text("x")
    message = (
        f"{other} is not a trace: it holds 4 entries (a.bin, c.json, notes.txt, …) "
        "but no manifest.json and no layer-N/<stage>.bin files"
    )
    code, out, err = run("diff", str(other), str(write_trace(tmp_path / "t")), "--check", "--json")
    assert (code, json.loads(out), err) == (5, {"error": message, "exit_code": 5}, f"error: {message}\n")


def test_check_refuses_traces_that_share_no_stage(tmp_path: Path) -> None:
    a = write_stages(tmp_path / "a", StageId(Stage.EMBEDDING, 0))
    b = write_stages(tmp_path / "b", StageId(Stage.FINAL_NORM), StageId(Stage.LM_HEAD))
    code, out, _ = run("diff", str(a), str(b))  # the report says what each side has
    assert code == 0 and "0 stages compared, 0 diverged." in out
    assert "final_norm: only in B\nlm_head: only in B\n" in out and "embedding at layer 0: only in A" in out
    assert run("diff", str(a), str(b), "--check") == (
        5,
        "",
        f"error: the traces share no stage, so there is nothing to check: {a} holds blk.0.embedding; "
        f"{b} holds final_norm, lm_head\n",
    )


def test_diff_of_two_aprender_moe_traces(tmp_path: Path) -> None:
    """aprender's qwen3_moe `--save-tensor` layout (bare APRT files, no manifest) with its moe_* stages:
    diffed in forward order (moe stages between ffn_norm and the layer output), the changed router weights
    named as the first divergence — once crashed with exit 70 (no MoE stages in the growth table)."""
    rng = np.random.default_rng(0)
    for side, bump in (("a", 0.0), ("b", 0.5)):
        for layer in range(2):
            for stage, shape in (("ffn_norm", (3, 8)), ("moe_router", (3, 2)), ("moe_router_indices", (3, 2)),
                                 ("moe_ffn_out", (3, 8)), ("post_ffn_residual", (3, 8))):  # fmt: skip
                x = np.random.default_rng(layer * 10 + len(stage)).standard_normal(shape).astype(np.float32)
                if side == "b" and layer == 1 and stage != "ffn_norm":
                    x = x + np.float32(bump)
                aprt.write_aprt(tmp_path / side / f"layer-{layer}" / f"{stage}.bin", layer, x)
    del rng
    code, out, err = run("diff", str(tmp_path / "a"), str(tmp_path / "b"), "--values", "--json")
    assert err == "" and code in (0, 1), err
    doc = json.loads(out)
    assert doc["first_divergence"]["id"] == "blk.1.moe_router"
    order = [r["id"] for r in doc["stages"] if r["id"].startswith("blk.1.")]
    assert order == [
        "blk.1.ffn_norm",
        "blk.1.moe_router",
        "blk.1.moe_router_indices",
        "blk.1.moe_ffn_out",
        "blk.1.post_ffn_residual",
    ]
    # the growth analysis (bisect's) of the same pair: the router is where the error appears
    from apr.diff.compare import diff_traces
    from apr.diff.growth import ToleranceModel, analyze
    from apr.trace.reader import read_trace

    growth = analyze(
        diff_traces(read_trace(tmp_path / "a"), read_trace(tmp_path / "b")), ToleranceModel(), ({}, {})
    )
    assert growth.first_jump is not None and str(growth.first_jump.diff.sid) == "blk.1.moe_router"


def test_a_missing_side_is_file_not_found_whatever_the_other_is(smollm2_gguf: Path, tmp_path: Path) -> None:
    """QA: a model against a missing path was read as an APRT stage file (exit 4, about the model)."""
    gone = tmp_path / "nonexist"
    for args in ((smollm2_gguf, gone), (gone, smollm2_gguf)):
        assert run("diff", *map(str, args)) == (3, "", f"error: File not found: {gone}\n")
