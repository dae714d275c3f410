"""Grouped "only in A/B" lines: one line per stage with its layer range and, where the other side's engine
recorded it, the reason (a reference trace against llama.cpp's, which fuses SwiGLU: no ffn_silu); and a named
stage the model lacks refused alike for every such stage (exit 5)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.cli import run, trace_all
from tests.fixtures.zoo import ZooModel

FUSED = (
    "ffn_silu at layers 0..2: only in A (llama.cpp computes act(gate)·up as one fused GLU op (SWIGLU: "
    "ffn_swiglu, GEGLU: ffn_geglu); act(gate) is never materialized)"
)


@pytest.fixture(scope="module")
def traces(zoo: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    z: ZooModel = zoo("llama")
    tmp = tmp_path_factory.mktemp("grouping")
    for engine in ("reference", "llama.cpp"):
        code, _, err = trace_all(z.gguf, tmp / engine, "--engine", engine, layers=2)
        assert code == 0, err
    return tmp / "reference", tmp / "llama.cpp"


def test_diff_groups_a_missing_stage_into_one_line_with_the_reason(traces: tuple[Path, Path]) -> None:
    code, out, _ = run("diff", str(traces[0]), str(traces[1]))
    assert code == 0
    assert [line for line in out.splitlines() if "only in" in line] == [FUSED]
    code, out, _ = run("diff", str(traces[1]), str(traces[0]))  # the other way round: only in B
    assert FUSED.replace("only in A", "only in B") in out


def test_diff_json_has_the_groups_with_their_reasons(traces: tuple[Path, Path]) -> None:
    code, out, _ = run("diff", str(traces[0]), str(traces[1]), "--json")
    assert code == 0
    doc = json.loads(out)
    reason = FUSED.split("only in A (", 1)[1][:-1]
    assert doc["only_in"] == [{"side": "A", "stage": "ffn_silu", "layers": [0, 1], "reason": reason}]
    assert doc["only_in_a"] == ["blk.0.ffn_silu", "blk.1.ffn_silu"]


def test_bisect_prints_the_same_grouped_line(traces: tuple[Path, Path]) -> None:
    code, out, _ = run("bisect", str(traces[0]), str(traces[1]))
    assert code == 0, out
    assert [line.strip() for line in out.splitlines() if "only in" in line] == [FUSED]


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ("moe_router", "stage moe_router exists only in mixture-of-experts models; this model is dense"),
        ("qkv_bias", "stage qkv_bias exists only in models with a q/k/v bias; this model has none"),
    ],
)
def test_a_named_stage_the_model_lacks_exits_5(zoo: Any, tmp_path: Path, stage: str, message: str) -> None:
    """qkv_bias on a bias-free model is refused as moe_router on a dense one (it wrote 0 files, exit 0)."""
    z: ZooModel = zoo("llama")
    code, _, err = run("trace", str(z.gguf), "--save-tensor", f"attn_out,{stage}", "--save-tensor-dir",
                       str(tmp_path / "t"))  # fmt: skip
    assert (code, err) == (5, f"error: {message}\n")
    assert not (tmp_path / "t").exists()
    code, _, err = run("trace", str(zoo("qwen2").gguf), "--save-tensor", "qkv_bias", "--save-tensor-layers",
                       "0..1", "--save-tensor-dir", str(tmp_path / "q"))  # fmt: skip
    assert code == 0 and (tmp_path / "q" / "layer-0" / "qkv_bias.bin").is_file(), err


def test_bisect_prints_both_sides_decoded_top_k_next_tokens(zoo: Any) -> None:
    """Oracle: transformers' own logits and tokenizer for the same prompt (probabilities to 1e-5)."""
    import json

    import torch
    import transformers

    z: ZooModel = zoo("llama")
    prompt = "the quick brown fox"
    args = ("bisect", str(z.hf_dir), str(z.hf_dir), "--engine-b", "transformers", "--prompt", prompt)
    code, out, err = run(*args, "--json")
    assert code == 0, err
    top = json.loads(out)["logits"]["top_k_last"]
    tok = transformers.AutoTokenizer.from_pretrained(z.hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(z.hf_dir, dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        p = torch.softmax(model(ids).logits[0, -1].double(), -1)
    want = torch.topk(p, 5)
    for side in ("a", "b"):
        assert [x["id"] for x in top[side]] == want.indices.tolist()
        assert [x["text"] for x in top[side]] == [tok.decode([i]) for i in want.indices.tolist()]
        assert [x["p"] for x in top[side]] == pytest.approx(want.values.tolist(), abs=1e-5)
    text = run(*args)[1]
    shown = ", ".join(f"{x['text']!r} {x['p']:.3f}" for x in top["a"])
    assert f"next token at the last position, top 5 (probability):\n  A: {shown}\n  B: " in text
