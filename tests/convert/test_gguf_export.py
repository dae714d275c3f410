"""`apr export --format gguf` / `apr convert -o x.gguf`: a GGUF that llama.cpp runs with the source's logits.

The oracle is llama.cpp (llama-cpp-python) on the GGUF that llama.cpp's own converter wrote from the same HF
folder (tests/fixtures/zoo.py), and llama.cpp's own quantizer (`llama_model_quantize`) for the bytes.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path
from typing import Any

import gguf
import llama_cpp
import numpy as np
import pytest
from click.testing import CliRunner

from apr.cli import cli
from apr.convert.gguf_export import export_gguf
from apr.formats.tokenizer import build_tokenizer
from apr.models import open_model
from tests.fixtures.cli import run as run_cli
from tests.fixtures.zoo import ZooModel
from tests.runtimes import PROMPT, PROMPT_IDS

pytestmark = pytest.mark.oracle

FAMILIES = ("llama", "llama3", "qwen2", "gemma2", "phi3", "granite")
LLAMA_FTYPE_Q8_0, LLAMA_FTYPE_Q6_K = 7, 18  # llama_ftype MOSTLY_Q8_0, MOSTLY_Q6_K


def llamacpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()


def tensors(path: Path) -> dict[str, Any]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_folder_exported_as_gguf_runs_in_llamacpp_like_the_converters_gguf(
    family: str, zoo: Any, tmp_path: Path
) -> None:
    z: ZooModel = zoo(family)
    out = tmp_path / f"{family}.gguf"
    export_gguf(open_model(z.hf_dir), out)
    ids = z.token_ids()
    ours, theirs = llamacpp_logits(out, ids), llamacpp_logits(z.gguf, ids)
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) <= 1e-6  # measured 0.0 (same bytes)
    assert open_model(out).config == open_model(z.gguf).config
    shapes = {n: tuple(t.shape) for n, t in tensors(out).items()}
    assert shapes == {n: tuple(t.shape) for n, t in tensors(z.gguf).items()}  # Phi-3: attn_qkv re-fused


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma2"])
def test_gguf_round_trip_keeps_config_and_logits(family: str, zoo: Any, tmp_path: Path) -> None:
    z: ZooModel = zoo(family)
    out = tmp_path / "again.gguf"
    source = open_model(z.gguf)
    result = export_gguf(source, out)
    assert open_model(out).config == source.config
    assert sorted(result.copied) == sorted(t.name for t in source.tensors())  # F32 → F32: byte for byte
    assert np.array_equal(llamacpp_logits(out, z.token_ids()), llamacpp_logits(z.gguf, z.token_ids()))


@pytest.mark.parametrize(("dtype", "ftype"), [("q8_0", LLAMA_FTYPE_Q8_0), ("q6_k", LLAMA_FTYPE_Q6_K)])
def test_export_is_byte_identical_to_llama_quantize(
    dtype: str, ftype: int, smollm2_f32_gguf: Path, tmp_path: Path
) -> None:
    """Every tensor, types included: Q6_K's rows of 576 fall back to Q8_0 in both."""
    ours, theirs = tmp_path / "apr.gguf", tmp_path / "llama.gguf"
    export_gguf(open_model(smollm2_f32_gguf), ours, dtype)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, 1
    assert (
        llama_cpp.llama_model_quantize(
            str(smollm2_f32_gguf).encode(), str(theirs).encode(), ctypes.byref(params)
        )
        == 0
    )
    a, b = tensors(ours), tensors(theirs)
    assert set(a) == set(b)
    for name, t in b.items():
        assert a[name].tensor_type == t.tensor_type, name
        assert np.array_equal(np.asarray(a[name].data), np.asarray(t.data)), name


def test_q4_k_export_of_smollm2_falls_back_where_rows_do_not_fit(
    smollm2_f32_gguf: Path, tmp_path: Path
) -> None:
    out = tmp_path / "q4k.gguf"
    r = export_gguf(open_model(smollm2_f32_gguf), out, "q4_k")
    written = {n: t.tensor_type.name for n, t in tensors(out).items()}
    assert written["blk.0.ffn_down.weight"] == "Q4_K"  # rows of 1536 = 6 blocks of 256
    assert written["blk.0.attn_q.weight"] == "Q5_0"  # rows of 576: llama-quantize's substitute
    assert len(r.fallback) == 181 and written["blk.0.attn_norm.weight"] == "F32"
    ids = list(PROMPT_IDS)
    ours, ref = llamacpp_logits(out, ids), llamacpp_logits(smollm2_f32_gguf, ids)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.98, cos  # measured 0.989: Q5_0/Q4_K noise (llama.cpp also quantizes activations)
    tok = build_tokenizer(open_model(out).tokenizer_spec())  # type: ignore[arg-type]
    assert tok.encode(PROMPT) == list(PROMPT_IDS)


def test_cli_export_gguf_and_convert_to_gguf(smollm2_gguf: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "smol-f16.gguf"
    r = runner.invoke(
        cli, ["export", str(smollm2_gguf), "-o", str(out), "--format", "gguf", "--dtype", "f16"]
    )
    assert r.exit_code == 0, r.output
    assert f"Wrote {out} (272 tensors, architecture llama)" in r.output
    assert {t.tensor_type.name for t in tensors(out).values()} == {"F16", "F32"}
    r = runner.invoke(
        cli, ["--json", "convert", str(out), "-o", str(tmp_path / "q6.gguf"), "--quantize", "q6_k"]
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["schema"] == "apr-export-gguf-v1" and doc["types"]["blk.0.ffn_down.weight"] == "Q6_K"
    assert open_model(tmp_path / "q6.gguf").config == open_model(smollm2_gguf).config
    r = runner.invoke(cli, ["export", str(out), "-o", str(tmp_path / "hf"), "--dtype", "q8_0"])
    assert r.exit_code == 5 and "unknown export dtype 'q8_0'" in r.output


def test_apr_converted_to_gguf_runs_in_llamacpp(
    smollm2_apr: Path, smollm2_f32_gguf: Path, tmp_path: Path
) -> None:
    """What `apr import` wrote (exact F32 of the Q4_1 GGUF) back as a GGUF: llama.cpp's logits of the F32
    fixture (gguf-py's dequantization of the same Q4_1 file), exactly."""
    out = tmp_path / "from-apr.gguf"
    code, out_text, err = run_cli("convert", str(smollm2_apr), "-o", str(out), "--quantize", "f32")
    assert code == 0 and "273 tensors copied byte for byte" in out_text, err
    ids = list(PROMPT_IDS)
    assert np.array_equal(llamacpp_logits(out, ids), llamacpp_logits(smollm2_f32_gguf, ids))


PRE_TEXT = "Hello world, 12 cats and 1000 dogs!\n\n  It's   naïve: 你好 🙂 x=3.14"


@pytest.mark.parametrize("family", ["qwen2", "llama3", "granite"])
def test_an_hf_byte_level_tokenizer_exports_with_the_pre_tokenizer_that_encodes_like_it(
    family: str, zoo: Any, tmp_path: Path
) -> None:
    """QA: every HF tokenizer.json was written as pre 'default' (GPT-2's split), so Qwen2's single-digit split
    was lost. The oracles: llama.cpp's tokenizer on the exported GGUF against transformers' on the folder."""
    from transformers import AutoTokenizer

    z: ZooModel = zoo(family)
    out = tmp_path / f"{family}.gguf"
    export_gguf(open_model(z.hf_dir), out)
    hf_ids = AutoTokenizer.from_pretrained(z.hf_dir)(PRE_TEXT, add_special_tokens=False)["input_ids"]
    llm = llama_cpp.Llama(str(out), n_ctx=64, verbose=False, vocab_only=True)
    try:
        assert llm.tokenize(PRE_TEXT.encode(), add_bos=False, special=False) == hf_ids
    finally:
        llm.close()
