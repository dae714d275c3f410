"""`apr diff MODEL_A MODEL_B`: the tensors' data, read in full (bytes, or values where storage differs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from apr.diff.models import diff_models
from apr.models import open_model
from tests.fixtures.cli import run
from tests.fixtures.gguf_edit import scale_tensor
from tests.fixtures.zoo import ZooModel


@pytest.fixture
def apr_pair(zoo: Any, tmp_path: Path) -> tuple[Path, Path]:
    """An .apr import of a tiny F32 GGUF and a copy with one bit flipped in the middle of the file."""
    ok, flip = tmp_path / "ok.apr", tmp_path / "flip.apr"
    assert run("import", str(zoo("qwen2").gguf), "-o", str(ok))[0] == 0
    data = bytearray(ok.read_bytes())
    data[len(data) // 2] ^= 0x01  # a tensor's bytes: the file is almost all tensor data
    flip.write_bytes(bytes(data))
    return ok, flip


def test_a_flipped_bit_in_one_tensor_fails_check(apr_pair: tuple[Path, Path]) -> None:
    ok, flip = apr_pair
    code, out, _ = run("diff", str(ok), str(flip), "--check")
    assert code == 1, out
    assert "tensors: identical names, shapes and types" in out
    assert "tensor data: 27 tensors compared, 1 differs" in out
    assert out.endswith("=> the models differ in what they compute\n")
    code, text, _ = run("diff", str(ok), str(flip), "--json")
    doc = json.loads(text)
    assert (code, doc["differs"], doc["verdict"]) == (0, True, "differ")
    assert out.splitlines()[-1] == "=> " + doc["verdict_text"]
    (d,) = doc["data"]["differ"]
    assert d["how"] == "bytes" and d["values_read"] and d["max_abs"] > 0 and d["changes_math"]
    assert f"    {d['name']}: bytes differ, max |a − b| " in out
    assert run("diff", str(ok), str(ok), "--check")[1].endswith("=> no difference in the math\n")


def test_without_data_the_verdict_says_the_data_was_not_compared(apr_pair: tuple[Path, Path]) -> None:
    ok, flip = apr_pair
    code, out, _ = run("diff", str(ok), str(flip), "--check", "--no-data")
    assert code == 0, out
    assert "tensor data: 27 not compared: not asked for" in out
    assert out.endswith(
        "=> no difference found in what was compared; not compared: the data of 27 tensors (not asked for)\n"
    )
    doc = json.loads(run("diff", str(ok), str(flip), "--json", "--no-data")[1])
    assert (doc["differs"], doc["verdict"], doc["data"]["compared"]) == (False, "unverified", 0)
    assert len(doc["data"]["not_compared"]) == 27


@pytest.mark.parametrize(
    "family",
    [
        "granite",  # Q/K rows interleaved in the GGUF: compared as values in HF order
        "gemma2",  # norms stored as 1 + w in the GGUF, w in HF: compared as the values the forward uses
        "qwen2_moe",  # HF per-expert tensors against the GGUF's stacks
        "phi3",  # HF's fused qkv_proj / gate_up_proj, read as row slices
    ],
)
def test_the_same_weights_stored_differently_compare_equal(zoo: Any, family: str) -> None:
    z: ZooModel = zoo(family)
    a, b = open_model(z.gguf), open_model(z.hf_dir)
    data = diff_models(a, b).data
    assert (data.compared, data.differ, data.skipped) == (len(a.tensors()), [], [])


def test_a_changed_row_of_an_interleaved_q_is_found_in_hf_order(zoo: Any, tmp_path: Path) -> None:
    z: ZooModel = zoo("granite")
    edited = scale_tensor(z.gguf, tmp_path / "q.gguf", "blk.1.attn_q.weight", 1.5, rows=slice(3, 4))
    d = diff_models(open_model(edited), open_model(z.hf_dir))
    (found,) = d.data.differ
    assert (found.name, found.how) == ("blk.1.attn_q.weight", "values")
    assert found.max_abs is not None and found.max_abs > 0 and d.differs
    code, out, _ = run("diff", str(edited), str(z.hf_dir), "--check")
    assert code == 1 and "    blk.1.attn_q.weight: values differ, max |a − b| " in out


@pytest.mark.parametrize("family", ["gemma2", "qwen3"])
def test_tied_embeddings_against_their_import_are_the_same_math(
    zoo: Any, tmp_path: Path, family: str
) -> None:
    """`apr import` writes a tied GGUF's lm_head out as output.weight: storage only, its data compared
    with the other side's token_embd (QA: SmolLM2, gemma2, gemma3, qwen3 against their .apr said differ)."""
    gguf, imported = zoo(family).gguf, tmp_path / "m.apr"
    assert run("import", str(gguf), "-o", str(imported))[0] == 0
    found = diff_models(open_model(gguf), open_model(imported))
    assert [(t.name, t.kind) for t in found.tensors] == [("output.weight", "tied")]
    assert (found.verdict, found.data.differ, found.data.skipped) == ("same", [], [])
    code, out, _ = run("diff", str(gguf), str(imported), "--check")
    assert code == 0 and out.endswith("=> no difference in the math\n"), out
    faulted = scale_tensor(gguf, tmp_path / "f.gguf", "token_embd.weight", rows=slice(3, 4))
    names = [d.name for d in diff_models(open_model(faulted), open_model(imported)).data.differ]
    assert names == ["token_embd.weight", "token_embd.weight (B: output.weight, tied)"]


def test_llama3_rope_freqs_against_the_hf_rope_scaling_is_storage_only(zoo: Any, tmp_path: Path) -> None:
    """QA: a Llama 3 GGUF (scaling as rope_freqs.weight, no factor) against its HF folder said differ."""
    z: ZooModel = zoo("llama3")
    found = diff_models(open_model(z.gguf), open_model(z.hf_dir))
    assert found.verdict == "same", [d for d in found.config if not d.storage]
    assert [(t.name, t.kind) for t in found.tensors] == [("rope_freqs.weight", "stored")]
    off = scale_tensor(z.gguf, tmp_path / "off.gguf", "rope_freqs.weight", 1.01)
    changed = diff_models(open_model(off), open_model(z.hf_dir))
    assert changed.verdict == "differ"
    assert "rope_scaling.factor" in [d.name for d in changed.math_config]
