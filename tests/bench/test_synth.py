"""bench/synth.py: a tiny synthetic Q4_K_M GGUF is a valid file (gguf-py reads it), has the Q4_K_M type mix,
sane weights and a real tokenizer, and apr (and llama.cpp, when installed) trace it to finite logits."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from apr.stages import Stage, StageId
from apr.trace.plan import TracePlan
from apr.trace.reader import read_trace
from apr.trace.run import TraceOptions, prepare_trace

ROOT = Path(__file__).resolve().parents[2]
TINY_LAYERS = 3  # use_more_bits(i, 3) holds for layer 2 only: both attn_v / ffn_down types occur
PROMPT = "What is 2+2?"
PROMPT_IDS = (1780, 314, 216, 34, 27, 34, 47)  # SmolLM2's tokenizer (spec/oracles.md §2)


def _synth() -> ModuleType:
    spec = importlib.util.spec_from_file_location("apr_bench_synth", ROOT / "bench" / "synth.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


synth = _synth()
TINY = synth.Shape("qwen2", hidden=256, layers=TINY_LAYERS, heads=4, kv_heads=2, ffn=512, vocab=49152 + 64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(synth.write_synthetic_gguf(tmp_path_factory.mktemp("synth") / "tiny.gguf", TINY, seed=7))


@pytest.fixture(scope="module")
def reader(tiny: Path) -> GGUFReader:
    return GGUFReader(tiny)  # ~2 s: it parses the 49k-token arrays


def test_the_file_has_every_tensor_with_the_q4_k_m_mix(reader: GGUFReader) -> None:
    r = reader
    got = {t.name: (t.tensor_type.name, tuple(int(n) for n in t.shape)) for t in r.tensors}
    expected = {t.name: (t.qtype.name, t.shape[::-1]) for t in synth.tensors(TINY)}  # GGUF shapes are ne
    assert got == expected
    assert len(got) == 2 + TINY_LAYERS * 12 + 1  # embd, output(+norm); per layer 9 weights, 3 biases
    q6_k = {name for name, (qtype, _) in got.items() if qtype == "Q6_K"}
    assert q6_k == {"output.weight", "blk.2.attn_v.weight", "blk.2.ffn_down.weight"}
    assert r.fields["general.architecture"].contents() == "qwen2"
    assert r.fields["qwen2.block_count"].contents() == TINY_LAYERS
    assert r.fields["general.file_type"].contents() == synth.FILE_TYPE_Q4_K_M


def test_weights_are_zero_mean_with_the_asked_scale(reader: GGUFReader) -> None:
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type)
        assert np.isfinite(w).all(), t.name
        if t.tensor_type in (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K):
            assert 0.015 < w.std() < 0.025, t.name
            assert abs(w.mean()) < 0.05 * w.std(), t.name
        elif t.name.endswith("norm.weight"):
            assert w.min() >= 0.9 and w.max() <= 1.1, t.name


def test_the_tokenizer_is_smollm2s_padded_with_unused_tokens(tiny: Path, reader: GGUFReader) -> None:
    r = reader
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == len(types) == TINY.vocab
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tokens[-1] == f"[PAD{TINY.vocab - 1}]" and set(types[49152:]) == {synth.TOKEN_TYPE_UNUSED}
    assert r.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert prepare_trace(tiny, PROMPT).token_ids == PROMPT_IDS


def test_the_same_seed_writes_the_same_bytes(tiny: Path, tmp_path: Path) -> None:
    again = synth.write_synthetic_gguf(tmp_path / "again.gguf", TINY, seed=7)
    other = synth.write_synthetic_gguf(tmp_path / "other.gguf", TINY, seed=8)
    assert again.read_bytes() == tiny.read_bytes()
    assert other.read_bytes() != tiny.read_bytes()


def test_apr_traces_every_stage_of_every_layer_to_finite_values(tiny: Path, tmp_path: Path) -> None:
    plan = TracePlan.from_cli("all", f"0..{TINY_LAYERS}")
    prepare_trace(tiny, PROMPT).run(plan, tmp_path / "t", TraceOptions())
    trace = read_trace(tmp_path / "t")
    assert StageId(Stage.POST_FFN_RESIDUAL, TINY_LAYERS - 1) in trace.entries
    for sid in trace.entries:
        assert np.isfinite(np.asarray(trace.load(sid))).all(), sid
    assert np.asarray(trace.load(StageId(Stage.LM_HEAD))).shape == (TINY.vocab,)


def test_llama_cpp_loads_it_and_agrees_on_tokens_and_logits(tiny: Path, tmp_path: Path) -> None:
    import llama_cpp

    llm = llama_cpp.Llama(str(tiny), n_ctx=64, n_threads=2, verbose=False, logits_all=False)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    assert tuple(ids) == PROMPT_IDS
    llm.eval(ids)
    theirs = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(TINY.vocab,)).copy()
    prepare_trace(tiny, PROMPT).run(TracePlan.from_cli("lm_head", "0..1"), tmp_path / "t", TraceOptions())
    ours = np.asarray(read_trace(tmp_path / "t").load(StageId(Stage.LM_HEAD)))
    cos = float(ours @ theirs / np.linalg.norm(ours) / np.linalg.norm(theirs))
    assert cos > 0.999  # llama.cpp quantizes activations to Q8_K: close, not equal


# the 30b-a3b preset's architecture at toy size: QK-norm, merged experts, an F32 router
TINY_MOE = synth.Shape(
    "qwen3moe", hidden=256, layers=2, heads=4, kv_heads=2, ffn=256, vocab=49152, key_length=128,
    experts=16, experts_used=4,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(synth.write_synthetic_gguf(tmp_path_factory.mktemp("synth") / "moe.gguf", TINY_MOE, seed=7))


def test_the_moe_preset_is_qwen3_30b_a3b_shaped() -> None:
    s = synth.PRESETS["30b-a3b"]
    assert (s.arch, s.layers, s.hidden, s.experts, s.experts_used, s.ffn) == (
        "qwen3moe",
        48,
        2048,
        128,
        8,
        768,
    )
    names = {t.name: t for t in synth.tensors(s) if t.name.startswith("blk.0.ffn")}
    assert names["blk.0.ffn_gate_exps.weight"].shape == (128, 768, 2048)
    assert names["blk.0.ffn_down_exps.weight"].shape == (128, 2048, 768)
    assert names["blk.0.ffn_gate_inp.weight"].qtype.name == "F32"
    assert 17 << 30 < synth.file_size(s) < 18 << 30


def test_a_tiny_moe_traces_with_the_experts_llama_cpp_selects(tiny_moe: Path, tmp_path: Path) -> None:
    import llama_cpp

    prepare_trace(tiny_moe, PROMPT).run(TracePlan.from_cli("all", "0..2"), tmp_path / "t", TraceOptions())
    trace = read_trace(tmp_path / "t")
    ids = np.asarray(trace.load(StageId(Stage.MOE_ROUTER_INDICES, 1)))
    assert ids.shape == (len(PROMPT_IDS), TINY_MOE.experts_used)
    assert len(np.unique(ids)) > TINY_MOE.experts_used  # the router spreads the tokens
    llm = llama_cpp.Llama(str(tiny_moe), n_ctx=64, n_threads=2, verbose=False, logits_all=False)
    llm.eval(list(PROMPT_IDS))
    theirs = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(TINY_MOE.vocab,)).copy()
    ours = np.asarray(trace.load(StageId(Stage.LM_HEAD)))
    assert float(ours @ theirs / np.linalg.norm(ours) / np.linalg.norm(theirs)) > 0.999
