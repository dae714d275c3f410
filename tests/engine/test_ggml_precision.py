"""`--precision ggml` against llama.cpp's own stage captures, per weight type: SmolLM2 as shipped (Q4_1 +
a Q8_0 token_embd) and as llama.cpp quantizes the F32 model to Q4_K_M, Q8_0 and IQ4_XS
(tests/quant/fixtures.py).

Every matmul stage — qkv_matmul, attn_out, ffn_gate, ffn_up, ffn_out of every layer, and lm_head — fed
llama.cpp's own input to it, comes out within `MATMUL_TOL` relative L2 of llama.cpp's output: bit for bit
for the Q4_1, Q5_0 and Q8_0 weights (apr.quant.vecdot_lanes: the kernels' own order), worst 6.3e-7 for the
K / IQ types (Q4_K_M's Q6_K / Q4_K ffn_down, IQ4_XS's IQ4_NL / IQ4_XS / Q5_K), where the plain f32
matmul misses by 4e-4 – 2e-3 at best.

A whole forward compounds: the activation quantizer is a step function, so a one-ulp difference in a
quantizer's input sometimes moves an element across a rounding boundary (~1e-4 in that matmul's
output), and the larger error flips more elements in the next layer. With RMSNorm and SiLU in ggml's
arithmetic (apr.engine.ops) and the kernels in their order, Q8_0 runs every stage within 3.1e-7 of
llama.cpp with bit-identical logits; Q4_1 is bit-identical up to blk.29.attn_out, where one element of its
Q8_1 input rounds the other way (2.6e-4; logits 8.1e-4); the attention internals (RoPE, Q·K, softmax,
·V) are the remaining one-ulp differences (≤ 3e-7). Q4_K_M and IQ4_XS part at layer 1, after the first
K / IQ matmul, and end ~2e-2 – 7e-2 apart, as without the emulation.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from pathlib import Path

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
BIT_CLOSE = 1e-6  # the attention internals (RoPE, Q·K, softmax, ·V) differ by an ulp here and there
# the first stage of a whole forward further than BIT_CLOSE from llama.cpp, and the worst stage's bound
FIRST_APART: dict[str, str | None] = {
    "Q8_0": None,
    "Q4_1": "blk.29.attn_out",  # one element of its Q8_1 input rounds the other way
    "Q4_K_M": "blk.1.attn_out",  # after layer 0's Q6_K / Q4_K ffn_down (not in the kernels' order)
    "IQ4_XS": "blk.1.ffn_gate",  # the IQ4_NL kernels are not in their order either
}
WHOLE_TOL = {"Q8_0": 1e-6, "Q4_1": 1e-3, "Q4_K_M": 0.1, "IQ4_XS": 0.1}
MATMUL_TOL = 2e-6
F32_MISS = 1e-4  # the plain f32 matmul on the same input misses llama.cpp by more than this
LLAMA_QUANTIZED = ("Q4_K_M", "Q8_0", "IQ4_XS")
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
def llamacpp(name: str) -> tuple[Recorder, QKLayout]:
    path = FILES[name]()
    model = open_model(path)
    rec = Recorder()
    graph = [n.stage for n in model.graph()]
    run = run_llamacpp(path, PROMPT_IDS, rec, nodes=model.family.ggml_nodes, expected=graph)
    return rec, run.qk_layout


def isolated_errors(name: str, ggml: bool) -> dict[StageId, float]:
    """Relative L2 error of each matmul stage computed from llama.cpp's own input to it."""
    model = open_model(FILES[name]())
    w = Weights(model, ggml=ggml)
    theirs = llamacpp(name)[0].arrays
    errors = {}
    for layer in range(model.config.n_layers):
        for stage, (source, weights) in MATMULS.items():
            x = theirs[StageId(source, layer)]
            ours = np.concatenate([w.linear(x, f"blk.{layer}.{n}.weight") for n in weights], axis=-1)
            errors[StageId(stage, layer)] = rel_l2(ours, theirs[StageId(stage, layer)])
    logits = w.linear(theirs[StageId(Stage.FINAL_NORM)], w.lm_head_name())
    errors[StageId(Stage.LM_HEAD)] = rel_l2(logits, theirs[StageId(Stage.LM_HEAD)])
    return errors


@pytest.mark.parametrize("name", FILES)
def test_every_matmul_on_llamacpps_input_matches_llamacpp(name: str) -> None:
    ggml, f32 = isolated_errors(name, ggml=True), isolated_errors(name, ggml=False)
    worst = max(ggml, key=ggml.__getitem__)
    print(f"{name}: worst {worst} {ggml[worst]:.1e}; f32 best {min(f32.values()):.1e}")
    assert {str(s): f"{e:.1e}" for s, e in ggml.items() if e > MATMUL_TOL} == {}
    assert min(f32.values()) > F32_MISS


def whole_trace_errors(name: str, ggml: bool) -> dict[StageId, float]:
    """Relative L2 error of every stage of a whole reference forward against llama.cpp's."""
    path = FILES[name]()
    model = open_model(path)
    ours = Recorder()
    model.family.forward(Weights(model, ggml=ggml), model.config, PROMPT_IDS, ours, lm_head_all=True)
    theirs, layout = llamacpp(name)
    sides = Side(layout, model.config), Side(model.config.qk_layout, model.config)
    errors = {}
    for sid in theirs.order:
        a, b = align(sid, theirs.arrays[sid], sides[0], ours.arrays[sid], sides[1])
        errors[sid] = rel_l2(a, b)
    return errors


@pytest.mark.parametrize("name", FILES)
def test_whole_trace_against_llamacpp(name: str) -> None:
    errors = whole_trace_errors(name, ggml=True)
    for stage in dict.fromkeys(sid.stage for sid in errors):
        e = [v for sid, v in errors.items() if sid.stage is stage]
        print(f"{name} {stage.value:20s} max {max(e):.1e} median {np.median(e):.1e}")
    first = next((sid for sid, e in errors.items() if e > BIT_CLOSE), None)
    assert (str(first) if first else None, max(errors.values()) <= WHOLE_TOL[name]) == (
        FIRST_APART[name],
        True,
    )
    if first is None:
        assert errors[StageId(Stage.LM_HEAD)] == 0.0  # the logits are llama.cpp's, bit for bit


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
