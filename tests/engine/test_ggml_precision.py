"""`--precision ggml` against llama.cpp's own stage captures, per weight type: SmolLM2 as shipped (Q4_1 +
a Q8_0 token_embd) and as llama.cpp quantizes the F32 model to Q4_K_M, Q8_0, Q6_K and IQ4_XS
(tests/quant/fixtures.py), with the F32 KV cache apr pins (the F16 one: tests/engine/test_kv_f16.py).

Every matmul stage — qkv_matmul, attn_out, ffn_gate, ffn_up, ffn_out of every layer, and lm_head — fed
llama.cpp's own input to it, comes out bit for bit: the Q4_1 / Q5_0 / Q8_0 kernels (apr.quant.
vecdot_lanes) and the K / IQ4 ones (apr.quant.vecdot_k: the repacked Q4_K / IQ4_NL gemm and gemv, the
Q5_K / Q6_K / IQ4_XS vec_dot below 8 tokens and the tiled kernel from 8), where the plain f32 matmul
misses by 4e-4 – 2e-3 at best.

A whole forward compounds: the activation quantizer is a step function, so a one-ulp difference in a
quantizer's input moves an element across a rounding boundary now and then (~1e-4 in that matmul's
output), and the larger error flips more elements in the next layer. With RMSNorm, SiLU, RoPE and the
attention (Q·Kᵀ, softmax, ·V) in ggml's f32 order too (apr.engine.ops, apr.engine.ggml_math), every stage
of every layer and the logits are llama.cpp's bits, for a prompt of 7 tokens (the repacked Q4_K gemm's
4-row groups plus 3 gemv rows; the K / IQ4_XS vec_dot) and of 12 (the tiled kernel). Tolerance: 0.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from apr.diff.align import Side, align
from apr.engine.weights import Weights
from apr.errors import ValidationError
from apr.formats.config import QKLayout
from apr.models import open_model
from apr.runtimes import run_llamacpp
from apr.stages import Stage, StageId
from apr.trace import format as aprt
from tests.fixtures import models
from tests.fixtures.cli import run
from tests.models.test_families import rel_l2
from tests.quant.fixtures import quantized_gguf
from tests.runtimes import PROMPT_IDS, Recorder

pytestmark = pytest.mark.oracle
WHOLE_TOL = 0.0  # relative L2 of every stage of a whole forward: bit for bit
MATMUL_TOL = 0.0  # each matmul on llama.cpp's own input: bit for bit
F32_MISS = 1e-4  # the plain f32 matmul on the same input misses llama.cpp by more than this
LLAMA_QUANTIZED = ("Q4_K_M", "Q8_0", "Q6_K", "IQ4_XS")
LONG_PROMPT = (*PROMPT_IDS, 1780, 314, 216, 34, 27)  # 12 tokens: the tiled K-quant path (≥ 8)
PROMPTS = {"7 tokens": PROMPT_IDS, "12 tokens": LONG_PROMPT}
FILES: dict[str, Callable[[], Path]] = {
    "Q4_1": models.smollm2_gguf,
    **{name: (lambda name=name: quantized_gguf(name, tokenizer=True)) for name in LLAMA_QUANTIZED},
}
# matmul stage → (the stage it reads, the weights it multiplies, in output order)
MATMULS: dict[Stage, tuple[Stage, tuple[str, ...]]] = {
    Stage.QKV_MATMUL: (Stage.ATTN_NORM, ("attn_q", "attn_k", "attn_v")),
    Stage.ATTN_OUT: (Stage.ATTENTION, ("attn_output",)),
    Stage.FFN_GATE: (Stage.FFN_NORM, ("ffn_gate",)),
    Stage.FFN_UP: (Stage.FFN_NORM, ("ffn_up",)),
    Stage.FFN_OUT: (Stage.FFN_SWIGL, ("ffn_down",)),
}


@cache
def llamacpp(name: str, ids: tuple[int, ...] = PROMPT_IDS, kv_type: str = "f32") -> tuple[Recorder, QKLayout]:
    path = FILES[name]()
    model = open_model(path)
    rec = Recorder()
    graph = [n.stage for n in model.graph()]
    run = run_llamacpp(path, ids, rec, nodes=model.family.ggml_nodes, expected=graph, kv_type=kv_type)
    return rec, run.qk_layout


def isolated_errors(name: str, ggml: bool, ids: tuple[int, ...] = PROMPT_IDS) -> dict[StageId, float]:
    """Relative L2 error of each matmul stage computed from llama.cpp's own input to it."""
    model = open_model(FILES[name]())
    w = Weights(model, ggml=ggml)
    theirs = llamacpp(name, ids)[0].arrays
    errors = {}
    for layer in range(model.config.n_layers):
        for stage, (source, weights) in MATMULS.items():
            x = theirs[StageId(source, layer)]
            ours = np.concatenate([w.linear(x, f"blk.{layer}.{n}.weight") for n in weights], axis=-1)
            errors[StageId(stage, layer)] = rel_l2(ours, theirs[StageId(stage, layer)])
    logits = w.linear(theirs[StageId(Stage.FINAL_NORM)], w.lm_head_name())
    errors[StageId(Stage.LM_HEAD)] = rel_l2(logits, theirs[StageId(Stage.LM_HEAD)])
    return errors


@pytest.mark.parametrize("name", sorted(set(FILES) - {"Q6_K"}))  # Q6_K: in Q4_K_M, and whole below
def test_every_matmul_on_llamacpps_input_matches_llamacpp(name: str) -> None:
    ggml, f32 = isolated_errors(name, ggml=True), isolated_errors(name, ggml=False)
    worst = max(ggml, key=ggml.__getitem__)
    print(f"{name}: worst {worst} {ggml[worst]:.1e}; f32 best {min(f32.values()):.1e}")
    assert {str(s): f"{e:.1e}" for s, e in ggml.items() if e > MATMUL_TOL} == {}
    assert min(f32.values()) > F32_MISS


def whole_trace_errors(
    name: str, ggml: bool, ids: tuple[int, ...] = PROMPT_IDS, kv_type: str = "f32", ours_kv: str = ""
) -> dict[StageId, float]:
    """Relative L2 error of every stage of a whole reference forward against llama.cpp's, llama.cpp's KV
    cache of `kv_type`, ours of `ours_kv` (default the same)."""
    path = FILES[name]()
    model = open_model(path)
    ours = Recorder()
    w = Weights(model, ggml=ggml, kv_f16=(ours_kv or kv_type) == "f16")
    model.family.forward(w, model.config, ids, ours, lm_head_all=True)
    theirs, layout = llamacpp(name, ids, kv_type)
    sides = Side(layout, model.config), Side(model.config.qk_layout, model.config)
    errors = {}
    for sid in theirs.order:
        a, b = align(sid, theirs.arrays[sid], sides[0], ours.arrays[sid], sides[1])
        errors[sid] = rel_l2(a, b)
    return errors


WHOLE_CASES = [(name, "7 tokens") for name in FILES] + [
    (name, "12 tokens")
    for name in ("Q4_K_M", "Q6_K", "IQ4_XS")  # the types the tiled path takes
]


@pytest.mark.parametrize(("name", "prompt"), WHOLE_CASES)
def test_whole_trace_against_llamacpp(name: str, prompt: str) -> None:
    errors = whole_trace_errors(name, ggml=True, ids=PROMPTS[prompt])
    for stage in dict.fromkeys(sid.stage for sid in errors):
        e = [v for sid, v in errors.items() if sid.stage is stage]
        print(f"{name} {stage.value:20s} max {max(e):.1e} median {np.median(e):.1e}")
    apart = {str(sid): f"{e:.1e}" for sid, e in errors.items() if e > WHOLE_TOL}
    assert apart == {}
    assert StageId(Stage.LM_HEAD) in errors and len(errors) > 30 * 15  # every layer's stages compared


def test_cli_trace_precision_ggml_records_the_emulation(smollm2_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "t"
    args = ["--save-tensor", "ffn_out", "--save-tensor-layers", "0..1", "--save-tensor-dir", str(out)]
    code, _, stderr = run("trace", str(smollm2_gguf), *args, "--precision", "ggml")
    assert (code, stderr) == (0, "")
    engine = json.loads((out / "manifest.json").read_text())["engine"]
    assert engine["precision"] == "ggml"
    assert engine["settings"]["vec_dot_types"] == "Q4_1→Q8_1, Q8_0→Q8_0"
    assert engine["settings"]["kv_cache"] == "f32"
    assert engine["settings"]["matmul"].startswith("ggml-cpu emulation")
    saved = aprt.read_aprt(out / "layer-0" / "ffn_out.bin").values
    model = open_model(smollm2_gguf)
    for ggml in (True, False):
        rec = Recorder()
        model.family.forward(Weights(model, ggml=ggml), model.config, PROMPT_IDS, rec)
        same = rec.arrays[StageId(Stage.FFN_OUT, 0)].tobytes() == saved.tobytes()
        assert same == ggml


ENGINE_REFUSALS = {
    "transformers": "--engine transformers computes in f32 or f64 only",
    "llama.cpp": "--engine llama.cpp computes in f32 only; drop --precision ggml",
}


@pytest.mark.parametrize("engine", ENGINE_REFUSALS)
def test_other_engines_refuse_precision_ggml(engine: str, smollm2_gguf: Path, tmp_path: Path) -> None:
    args = [
        "--engine",
        engine,
        "--precision",
        "ggml",
        "--save-tensor",
        "ffn_out",
        "--save-tensor-dir",
        str(tmp_path),
    ]
    code, _, stderr = run("trace", str(smollm2_gguf), *args)
    assert (code, stderr) == (5, f"error: {ENGINE_REFUSALS[engine]}\n")


def test_ggml_matmuls_are_float32_only(smollm2_gguf: Path) -> None:
    with pytest.raises(ValidationError, match=r"ggml's matmul arithmetic is float32 \(--precision ggml\)"):
        Weights(open_model(smollm2_gguf), np.float64, ggml=True)


def _q8_0(source: Path, out: Path) -> Path:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.pure = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, True
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


@pytest.mark.parametrize("kv_type", ["f32", "f16"])
def test_a_neox_model_with_a_short_head_matches_llamacpp(
    zoo: Callable[[str], Any], kv_type: str, tmp_path: Path
) -> None:
    """qwen2 (NEOX rope, q/k/v bias, head_dim 16: Q·Kᵀ is all vec_dot_f32 leftovers) quantized to Q8_0 by
    llama.cpp, 9 tokens: every stage bit for bit, with either cache."""
    path = _q8_0(zoo("qwen2").gguf, tmp_path / "qwen2-q8_0.gguf")
    model = open_model(path)
    ids = tuple(range(5, 14))
    theirs = Recorder()
    graph = [n.stage for n in model.graph()]
    run = run_llamacpp(path, ids, theirs, nodes=model.family.ggml_nodes, expected=graph, kv_type=kv_type)
    ours = Recorder()
    w = Weights(model, ggml=True, kv_f16=kv_type == "f16")
    model.family.forward(w, model.config, ids, ours, lm_head_all=True)
    sides = Side(run.qk_layout, model.config), Side(model.config.qk_layout, model.config)
    apart = {}
    for sid in theirs.order:
        e = rel_l2(*align(sid, theirs.arrays[sid], sides[0], ours.arrays[sid], sides[1]))
        if e > WHOLE_TOL:
            apart[str(sid)] = f"{e:.1e}"
    assert (run.qk_layout, apart) == (QKLayout.HF, {})
