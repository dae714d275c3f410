"""`apr bisect` and cross-runtime traces on the real SmolLM2 (F32 copy made by gguf-py; Q4_1 original).

Fault injection: a copy of the F32 GGUF with one tensor scaled by 1.01 — the layer and the tensor chosen at
random by the test (the seed is printed; APR_FAULT_SEED=N repeats a run) — must be found at that layer and
at the first stage that consumes the tensor. The same for a norm weight and for an embedding row used by
the prompt.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest

from apr.stages import Stage, StageId
from tests.fixtures.cli import run, trace_all
from tests.fixtures.gguf_edit import scale_tensor as corrupt
from tests.fixtures.traces import write_stages

CONSUMER = {
    "attn_q.weight": "qkv_matmul",
    "attn_k.weight": "qkv_matmul",
    "attn_v.weight": "qkv_matmul",
    "attn_output.weight": "attn_out",
    "ffn_gate.weight": "ffn_gate",
    "ffn_up.weight": "ffn_up",
    "ffn_down.weight": "ffn_out",
}
NORMS = {"attn_norm.weight": "attn_norm", "ffn_norm.weight": "ffn_norm"}
PROMPT_IDS = [1780, 314, 216, 34, 27, 34, 47]


def bisect_json(a: Path, b: Path, *extra: str) -> tuple[int, dict]:
    code, out, err = run("bisect", str(a), str(b), "--json", *extra)
    assert err == "", err
    return code, json.loads(out)


@pytest.fixture
def rng() -> random.Random:
    seed = int(os.environ.get("APR_FAULT_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"fault-injection seed {seed}")
    return random.Random(seed)


def test_random_weight_fault_is_found_at_its_layer_and_first_consumer(
    smollm2_f32_gguf: Path, tmp_path: Path, rng: random.Random
) -> None:
    layer, suffix = rng.randrange(30), rng.choice(sorted(CONSUMER))
    bad = corrupt(smollm2_f32_gguf, tmp_path / "bad.gguf", f"blk.{layer}.{suffix}")
    code, doc = bisect_json(smollm2_f32_gguf, bad)
    first = doc["first_divergence"]
    print(f"blk.{layer}.{suffix} → {first and first['id']}")
    assert code == 1 and (first["layer"], first["stage"]) == (layer, CONSUMER[suffix])
    assert first["input_error"] == 0.0
    if CONSUMER[suffix] == "qkv_matmul":
        # q, k and v share one fused stage: its error is 1 % times the scaled slice's share of the stage's
        # norm (k and v are 192 of its 960 columns; blk.2.attn_v gave 0.00096), yet far above the exact
        # zero of every earlier stage
        assert 1e-4 < first["error"] < 0.01
    else:
        assert first["error"] == pytest.approx(0.01, rel=0.02)  # the whole stage scaled by 1.01
    assert all(not s["jump"] for s in doc["stages"] if (s["layer"] or 0) < layer)


def test_random_norm_fault(smollm2_f32_gguf: Path, tmp_path: Path, rng: random.Random) -> None:
    layer, suffix = rng.randrange(30), rng.choice(sorted(NORMS))
    bad = corrupt(smollm2_f32_gguf, tmp_path / "bad.gguf", f"blk.{layer}.{suffix}")
    code, doc = bisect_json(smollm2_f32_gguf, bad, "--isolate")
    first = doc["first_divergence"]
    assert code == 1 and (first["layer"], first["stage"]) == (layer, NORMS[suffix])
    assert first["error"] == pytest.approx(0.01, rel=0.05)  # a 1 % scale of the norm weight
    own = {x["id"]: x for x in doc["isolated"]}
    fault = own[f"blk.{layer}.{NORMS[suffix]}"]
    assert fault["own_error"] == pytest.approx(fault["total_error"], rel=1e-3)  # made here, not inherited
    if layer < 29:
        after = own[f"blk.{layer + 1}.attn_norm"]
        assert after["own_error"] < 1e-6 < after["inherited"]  # the next layer only carries it


def test_embedding_row_of_a_prompt_token(smollm2_f32_gguf: Path, tmp_path: Path, rng: random.Random) -> None:
    token = rng.choice(PROMPT_IDS)
    bad = corrupt(smollm2_f32_gguf, tmp_path / "bad.gguf", "token_embd.weight", rows=slice(token, token + 1))
    code, doc = bisect_json(smollm2_f32_gguf, bad)
    assert code == 1 and (doc["first_divergence"]["layer"], doc["first_divergence"]["stage"]) == (
        0,
        "embedding",
    )
    assert doc["first_divergence"]["worst"]["coords"]["seq"] in [
        i for i, t in enumerate(PROMPT_IDS) if t == token
    ]


def test_identical_models_exit_0(smollm2_f32_gguf: Path, tmp_path: Path) -> None:
    report = tmp_path / "r.html"
    code, out, _ = run("bisect", str(smollm2_f32_gguf), str(smollm2_f32_gguf), "--report", str(report))
    assert code == 0 and "verdict: no stage adds more error" in out
    page = report.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    cells = re.findall(r'<rect class="cell"[^>]* fill="([^"]+)"', page)  # identical: blank, not noise
    assert len(cells) > 30 * 15 and set(cells) == {"#ffffff"} and "kl-bar" not in page


def test_q4_1_against_f32_through_llamacpp_is_quantization_not_a_bug(
    smollm2_gguf: Path, smollm2_f32_gguf: Path, tmp_path: Path
) -> None:
    code, doc = bisect_json(
        smollm2_f32_gguf,
        smollm2_gguf,
        "--engine-a",
        "llama.cpp",
        "--engine-b",
        "llama.cpp",
        "--report",
        str(tmp_path / "q.html"),
    )
    assert code == 0 and doc["first_divergence"] is None
    errors = [x["output"]["error"] for x in doc["layers"]]
    print("per-layer output relative error:", " ".join(f"{e:.1e}" for e in errors))
    assert len(errors) == 30 and min(errors) > 1e-3 and max(errors) < 0.1  # quantization noise everywhere
    assert doc["first_beyond_cosine"] is not None  # aprender's fixed cosine rule would have cried wolf
    assert doc["logits"]["top5_overlap"] >= 0.8 and doc["logits"]["kl_max"] < 0.02


@pytest.mark.oracle
@pytest.mark.parametrize("engine", ["transformers", "llama.cpp"])
def test_runtime_traces_diff_clean_against_the_reference(
    smollm2_f32_gguf: Path, tmp_path: Path, engine: str
) -> None:
    ref, other = tmp_path / "ref", tmp_path / engine
    for eng, out in (("reference", ref), (engine, other)):
        code, stdout, stderr = trace_all(smollm2_f32_gguf, out, "--engine", eng)
        assert code == 0, stderr
    if engine == "llama.cpp":
        assert "ffn_silu at layer(s) 0..30: " in stdout  # said, not silently skipped
    code, out, _ = run("diff", str(ref), str(other), "--values", "--check", "--min-cos", "0.99999")
    print(out.splitlines()[-3:])
    assert code == 0 and "0 diverged" in out


def test_tokenizer_disagreement_is_refused(smollm2_gguf: Path, tmp_path: Path) -> None:
    from tests.runtimes import write_tiny_gguf

    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    code, _, err = run("bisect", str(smollm2_gguf), str(tiny))
    assert code == 5 and "tokenize the prompt differently" in err and err.count("\n") == 1


def test_bisect_accepts_a_trace_directory(smollm2_gguf: Path, smollm2_apr: Path, tmp_path: Path) -> None:
    assert trace_all(smollm2_gguf, tmp_path / "t", "--prompt", "The capital of France is")[0] == 0
    code, doc = bisect_json(tmp_path / "t", smollm2_apr)
    assert code == 0 and doc["token_ids"] == [504, 3575, 282, 4649, 314]  # B ran on the trace's prompt
    assert all(s["identical"] for s in doc["stages"] if s["stage"] != "lm_head")


def test_bisect_refuses_traces_that_share_no_stage(tmp_path: Path) -> None:
    a = write_stages(tmp_path / "a", StageId(Stage.EMBEDDING, 0))
    b = write_stages(tmp_path / "b", StageId(Stage.LM_HEAD))
    assert run("bisect", str(a), str(b)) == (
        5,
        "",
        f"error: the traces share no stage, so there is nothing to check: {a} holds blk.0.embedding; "
        f"{b} holds lm_head\n",
    )


RAN = "is a trace directory, already run."
OWN_PROMPT = "cannot apply: a trace directory brings its own prompt (a model beside it runs on it)."
TRACE_SIDE_FLAGS = [
    (("--engine-a", "llama.cpp"), "both", f"--engine-a applies to a model; A {RAN}"),
    (("--precision-b", "ggml"), "b", f"--precision-b applies to a model; B {RAN}"),
    (("--prompt", "Hi"), "a", f"--prompt {OWN_PROMPT}"),
    (("--tokens", "1,2"), "b", f"--tokens {OWN_PROMPT}"),
    (("--progress",), "both", "--progress applies when a side runs; both sides are trace directories."),
]


@pytest.mark.parametrize(("flag", "traces", "message"), TRACE_SIDE_FLAGS)
def test_flags_a_trace_directory_side_would_ignore_are_usage_errors(
    tmp_path: Path, flag: tuple[str, ...], traces: str, message: str
) -> None:
    t = write_stages(tmp_path / "t", StageId(Stage.EMBEDDING, 0))
    model = tmp_path / "m.gguf"  # never opened: the check comes first
    a, b = (t, t) if traces == "both" else (t, model) if traces == "a" else (model, t)
    assert run("bisect", str(a), str(b), *flag) == (2, "", f"error: {message} Try 'apr bisect --help'.\n")


def test_keep_with_two_trace_directories_is_refused_and_makes_nothing(tmp_path: Path) -> None:
    t = write_stages(tmp_path / "t", StageId(Stage.EMBEDDING, 0))
    code, _, stderr = run("bisect", str(t), str(t), "--keep", str(tmp_path / "kept"))
    assert code == 2 and "--keep applies when a side runs" in stderr
    assert not (tmp_path / "kept").exists()
