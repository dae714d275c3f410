"""Every dense family against its oracles, on tiny random checkpoints converted by llama.cpp's own converter.

Per family (tests/fixtures/zoo.py builds them: transformers config, fixed seed, norms not ones):
- the reference engine on the HF folder vs transformers, every stage of every layer: relative L2 error
  ‖ours − theirs‖ / ‖theirs‖ ≤ 1e-5 in float32, ≤ 1e-10 in float64 (transformers run in true float64; not for
  RoPE scaling, which the float64 lift does not reimplement — refused there, and tested as refused);
- the reference engine on the F32 GGUF vs llama.cpp on the same file (F32 KV cache): logits of every position
  and every layer output ≤ 1e-5 — Gemma 5e-4: ggml's CPU GELU rounds its input to f16 and looks it up in a
  table (GGML_GELU_FP16), measured 1.1e-4 / 1.4e-4 on the logits;
- the GGUF and HF traces of the same weights, every stage after Q/K-layout alignment, ≤ 1e-5 — except Mistral,
  whose sliding window transformers applies and llama.cpp (so the GGUF, which carries no window) does not:
  there the positions past the window must differ, and the ones inside it agree;
- `apr import` of the GGUF: every stage of the .apr trace bit-identical to the GGUF's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from apr.convert.importer import import_gguf
from apr.diff.align import Side, align
from apr.engine.weights import Weights
from apr.errors import ValidationError
from apr.models import open_model
from apr.runtimes import run_llamacpp, run_transformers
from apr.stages import Stage, StageId
from tests.fixtures.zoo import ZooModel
from tests.runtimes import Recorder

pytestmark = pytest.mark.oracle
DENSE = (
    "llama",
    "llama3",
    "llama_linear",
    "llama_yarn",
    "mistral",
    "qwen2",
    "qwen3",
    "granite",
    "gemma2",
    "gemma3",
    "phi3",
    "olmo2",
)
LLAMACPP_TOL = {"gemma2": 5e-4, "gemma3": 5e-4}  # ggml's f16-table GELU (module docstring)
F32_TOL, F64_TOL, CROSS_TOL = 1e-5, 1e-10, 1e-5


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def reference(path: Path, ids: list[int], dtype: Any = np.float32) -> Recorder:
    m = open_model(path)
    rec = Recorder()
    m.family.forward(Weights(m, dtype), m.config, ids, rec, lm_head_all=True)
    return rec


@pytest.fixture(scope="module", params=DENSE)
def family(request: pytest.FixtureRequest, zoo: Callable[[str], ZooModel]) -> ZooModel:
    return zoo(str(request.param))


@pytest.mark.parametrize(
    ("precision", "dtype", "tol"), [("float32", np.float32, F32_TOL), ("float64", np.float64, F64_TOL)]
)
def test_hf_every_stage_matches_transformers(
    family: ZooModel, precision: str, dtype: Any, tol: float
) -> None:
    ids = family.token_ids()
    model = open_model(family.hf_dir)
    graph = [n.stage for n in model.graph()]
    theirs = Recorder()
    run = lambda: run_transformers(  # noqa: E731
        family.hf_dir, ids, theirs, dtype=precision, hooks=model.family.hooks, expected=graph
    )
    if precision == "float64" and model.config.rope_scaling.kind != "default":
        with pytest.raises(ValidationError, match="float64 oracle supports default RoPE only"):
            run()
        return
    result = run()
    ours = reference(family.hf_dir, ids, dtype)
    assert set(result.unavailable) <= {Stage.QKV_BIAS}, result.unavailable  # every stage is compared
    assert {sid.stage for sid in theirs.order} == {
        s for s in graph if s is not Stage.QKV_BIAS or model.config.qkv_bias
    }
    errors = {sid: rel_l2(ours.arrays[sid], theirs.arrays[sid]) for sid in theirs.order}
    worst = max(errors, key=errors.__getitem__)
    print(f"{family.family} {precision}: {len(errors)} stages, worst {worst} {errors[worst]:.2e}")
    assert errors[worst] <= tol, f"{worst}: {errors[worst]:.3e} > {tol:g}"


def test_gguf_logits_and_layer_outputs_match_llamacpp(family: ZooModel) -> None:
    ids = family.token_ids()
    ours, theirs = reference(family.gguf, ids), Recorder()
    run_llamacpp(family.gguf, ids, theirs)
    tol = LLAMACPP_TOL.get(family.family, F32_TOL)
    outputs = [sid for sid in theirs.order if sid.stage in (Stage.POST_FFN_RESIDUAL, Stage.LM_HEAD)]
    assert len(outputs) == open_model(family.gguf).config.n_layers + 1
    errors = {sid: rel_l2(ours.arrays[sid], theirs.arrays[sid]) for sid in outputs}
    worst = max(errors, key=errors.__getitem__)
    print(f"{family.family} vs llama.cpp: worst {worst} {errors[worst]:.2e}")
    assert errors[worst] <= tol, f"{worst}: {errors[worst]:.3e} > {tol:g}"


def test_gguf_and_hf_traces_agree(family: ZooModel) -> None:
    ids = family.token_ids()
    a, b = reference(family.gguf, ids), reference(family.hf_dir, ids)
    side_a = Side(open_model(family.gguf).config.qk_layout, open_model(family.gguf).config)
    side_b = Side(open_model(family.hf_dir).config.qk_layout, open_model(family.hf_dir).config)
    assert set(a.arrays) == set(b.arrays)
    window = open_model(family.hf_dir).config.sliding_window if family.family == "mistral" else 0
    for sid in a.order:
        x, y = align(sid, a.arrays[sid], side_a, b.arrays[sid], side_b)
        if window and sid.stage not in (Stage.EMBEDDING,) and (sid.layer or 0) >= 0:
            continue  # checked below
        assert rel_l2(x, y) <= CROSS_TOL, (sid, rel_l2(x, y))
    if window:  # GGUF: no window (llama.cpp); HF: window — equal inside it, different past it
        out = StageId(Stage.POST_FFN_RESIDUAL, 0)
        x, y = a.arrays[out], b.arrays[out]
        assert rel_l2(x[:window], y[:window]) <= CROSS_TOL
        assert rel_l2(x[window:], y[window:]) > 1e-3


def test_imported_apr_trace_is_bit_identical_to_the_gguf(family: ZooModel, tmp_path: Path) -> None:
    ids = family.token_ids()
    out = tmp_path / f"{family.family}.apr"
    import_gguf(family.gguf, out)
    a, b = reference(family.gguf, ids), reference(out, ids)
    assert a.order == b.order
    for sid in a.order:
        assert np.array_equal(a.arrays[sid], b.arrays[sid]), sid


def test_export_of_the_gguf_loads_in_transformers_with_the_same_logits(
    family: ZooModel, tmp_path: Path
) -> None:
    """GGUF → `apr export` → transformers: its logits (every position) equal the reference on the GGUF.

    Llama 3's GGUF carries per-frequency RoPE divisors (rope_freqs.weight): the export states the
    rope_scaling that gives them back, and transformers' RoPE from it must match."""
    from apr.convert.export import export_safetensors

    ids = family.token_ids()
    model = open_model(family.gguf)
    export_safetensors(model, tmp_path / "hf")
    theirs = Recorder()
    run_transformers(
        tmp_path / "hf", ids, theirs, hooks=model.family.hooks, expected=[n.stage for n in model.graph()]
    )
    ours = reference(family.gguf, ids)
    lm = StageId(Stage.LM_HEAD)
    window = model.config.sliding_window if family.family == "mistral" else 0
    assert window == 0  # the GGUF carries no window, so neither does its export
    assert rel_l2(ours.arrays[lm], theirs.arrays[lm]) <= CROSS_TOL


# a tensor of the family's own, and the first stage that consumes it (what bisect must name)
FAULTS = {
    "llama": ("ffn_up.weight", "ffn_up"),
    "llama3": ("attn_q.weight", "qkv_matmul"),
    "llama_linear": ("ffn_gate.weight", "ffn_gate"),
    "llama_yarn": ("attn_output.weight", "attn_out"),
    "mistral": ("attn_v.weight", "qkv_matmul"),
    "qwen2": ("attn_k.bias", "qkv_bias"),
    "qwen3": ("attn_k_norm.weight", "k_post_rope"),
    "granite": ("ffn_down.weight", "ffn_out"),
    "gemma2": ("post_ffw_norm.weight", "ffn_post_norm"),
    "gemma3": ("attn_q_norm.weight", "q_post_rope"),
    "phi3": ("attn_qkv.weight", "qkv_matmul"),
    "olmo2": ("post_attention_norm.weight", "attn_post_norm"),
}


def test_bisect_finds_a_fault_in_the_familys_own_tensor(family: ZooModel, tmp_path: Path) -> None:
    """`apr bisect good.gguf bad.gguf`: a 1 % change to one tensor of the last layer is the first divergence,
    at the stage that consumes it, and no earlier stage jumps."""
    from tests.fixtures.gguf_edit import scale_tensor as corrupt
    from tests.test_cli_bisect import bisect_json

    layer = open_model(family.gguf).config.n_layers - 1
    suffix, stage = FAULTS[family.family]
    bad = corrupt(family.gguf, tmp_path / "bad.gguf", f"blk.{layer}.{suffix}")
    code, doc = bisect_json(family.gguf, bad, "--prompt", "Hello world, this is a test of the bisection")
    first = doc["first_divergence"]
    assert code == 1 and (first["layer"], first["stage"]) == (layer, stage), first
    assert all(not s["jump"] for s in doc["stages"] if (s["layer"] or 0) < layer)
