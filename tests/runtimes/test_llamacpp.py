"""The llama.cpp runtime, and llama.cpp against transformers stage by stage (oracles.md §5).

On the F32 GGUF both runtimes compute the same f32 math (flash attention off, F32 KV cache): every stage
agrees to ~1e-5 relative. On the Q4_1 GGUF llama.cpp quantizes activations to Q8_1, so only the logits
are compared, loosely. transformers dequantizes the Q4_1 GGUF with gguf-py, which gives exactly the
weights of the F32 fixture, so one transformers run of the F32 GGUF is the reference for both.
"""

from __future__ import annotations

import ctypes
import importlib
import sys
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from apr.errors import (
    WHEEL,
    FeatureDisabledError,
    InferenceError,
    ModelLoadError,
    NotFoundError,
    ValidationError,
)
from apr.formats.config import QKLayout
from apr.models.common import LLAMA_NODES
from apr.runtimes import RuntimeRun, llamacpp_ggml, run_llamacpp, run_transformers
from apr.runtimes.base import model_stages
from apr.stages import Stage, StageId
from tests.runtimes import (
    PROMPT_IDS,
    SMOLLM2,
    TINY_DIMS,
    Dims,
    Recorder,
    canonical_shape,
    cosine,
    expected_order,
    rel_err,
    to_hf_order,
    transformers_run,
    write_tiny_gguf,
)

pytestmark = pytest.mark.oracle

STAGE_RTOL = 1e-4  # max|a−b| / max|b| per stage, all layers (measured ≤ 1e-5)
STAGE_MIN_COSINE = 0.99999
LOGIT_ATOL = 1e-4  # measured 4.4e-5
Q4_1_MIN_COSINE = 0.997  # per position; llama.cpp runs Q4_1 with Q8_1 activations (oracles §5)

Capture = tuple[RuntimeRun, Recorder]
HINT = (
    "[llamacpp]: from a checkout, pip install -e '.[llamacpp]' (make dev installs every extra); from a "
    f"wheel, pip install '{WHEEL}[llamacpp]'"
)


def capture(path: Path, ids: tuple[int, ...] = PROMPT_IDS) -> Capture:
    rec = Recorder()
    return run_llamacpp(path, ids, rec), rec


@pytest.fixture(scope="module")
def llama_f32(smollm2_f32_gguf: Path) -> Capture:
    return capture(smollm2_f32_gguf)


@pytest.fixture(scope="module")
def hf_f32(smollm2_f32_gguf: Path) -> Capture:
    return transformers_run(smollm2_f32_gguf, PROMPT_IDS)


def compare(llama: Capture, hf: Capture, m: Dims) -> dict[Stage, tuple[float, float, StageId]]:
    """Worst (relative error, cosine, where) per stage over every layer both runtimes expose."""
    (run, rec), (_, ref) = llama, hf
    worst: dict[Stage, tuple[float, float, StageId]] = {}
    for sid, a in rec.arrays.items():
        a, b = to_hf_order(sid, a, run.qk_layout, m), ref.arrays[sid]
        err, cos = rel_err(a, b), cosine(a, b)
        old = worst.get(sid.stage, (0.0, 1.0, sid))
        worst[sid.stage] = (max(old[0], err), min(old[1], cos), sid if err > old[0] else old[2])
    return worst


def print_table(title: str, worst: dict[Stage, tuple[float, float, StageId]]) -> None:
    print(f"\n{title}\n{'stage':<20} {'max rel err':>12} {'1 - min cos':>12}  worst at")
    for stage, (err, cos, sid) in worst.items():
        print(f"{stage:<20} {err:>12.2e} {1 - cos:>12.1e}  {sid}")


def test_run_record(llama_f32: Capture) -> None:
    run, _ = llama_f32
    assert run.engine == "llama.cpp"
    assert run.engine_version.startswith("llama-cpp-python 0.3.36 (ggml 0.25.3 0c1e570")
    assert run.token_ids == PROMPT_IDS
    assert run.qk_layout is QKLayout.INTERLEAVED  # a llama GGUF: NORM rope, permuted Q/K rows
    assert run.unavailable == (Stage.FFN_SILU,)
    assert any(n.startswith("ffn_silu: llama.cpp computes act(gate)·up as one fused GLU") for n in run.notes)
    assert run.settings == {
        "flash_attn": "off",
        "kv_cache": "f32",
        "n_threads": "2",
        "n_ctx": "256",
        "n_ubatch": "256",
        "n_gpu_layers": "0",
        "rope_type": "norm",
        "kq_scale": "0.125",
    }


def test_every_stage_but_ffn_silu_in_forward_order(llama_f32: Capture) -> None:
    _, rec = llama_f32
    assert rec.order == expected_order(SMOLLM2.layers, qkv_bias=False, lacking={Stage.FFN_SILU})
    for sid, a in rec.arrays.items():
        assert a.dtype == np.float32 and a.flags.c_contiguous, sid
        assert a.shape == canonical_shape(sid.stage, len(PROMPT_IDS), SMOLLM2), sid
        assert np.isfinite(a).all(), sid
    upper = np.triu(np.ones((len(PROMPT_IDS),) * 2, dtype=bool), k=1)
    for layer in range(SMOLLM2.layers):
        for stage in (Stage.ATTN_SCORES, Stage.ATTN_SOFTMAX):
            assert (rec.arrays[StageId(stage, layer)][:, upper] == 0).all()


def test_f32_stages_match_transformers(llama_f32: Capture, hf_f32: Capture) -> None:
    worst = compare(llama_f32, hf_f32, SMOLLM2)
    print_table("llama.cpp vs transformers, SmolLM2 F32 GGUF, 'What is 2+2?'", worst)
    assert set(worst) == set(model_stages(qkv_bias=False)) - {Stage.FFN_SILU}
    bad = {s: w for s, w in worst.items() if w[0] > STAGE_RTOL or w[1] < STAGE_MIN_COSINE}
    assert not bad, bad


def test_f32_logits_match_transformers(llama_f32: Capture, hf_f32: Capture) -> None:
    a = llama_f32[1].arrays[StageId(Stage.LM_HEAD)]
    b = hf_f32[1].arrays[StageId(Stage.LM_HEAD)]
    print(f"\nF32 logits: max abs diff {np.abs(a - b).max():.2e}")
    assert np.abs(a - b).max() <= LOGIT_ATOL
    assert (a.argmax(-1) == b.argmax(-1)).all()


def test_q4_1_logits_close_to_transformers(smollm2_gguf: Path, hf_f32: Capture) -> None:
    run, rec = capture(smollm2_gguf)
    assert run.unavailable == (Stage.FFN_SILU,)
    a = rec.arrays[StageId(Stage.LM_HEAD)]
    b = hf_f32[1].arrays[StageId(Stage.LM_HEAD)]
    per_position = [cosine(a[p], b[p]) for p in range(len(PROMPT_IDS))]
    print(f"\nQ4_1 logits: per-position cosine {[round(c, 5) for c in per_position]}")
    assert min(per_position) >= Q4_1_MIN_COSINE


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_architectures_match_transformers(
    arch: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """qwen2 has q/k/v bias and an unnamed O-projection node; qwen2/3 use NEOX rope (HF order)."""
    path, m, ids = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch), TINY_DIMS[arch], (5, 17, 200, 33)
    llama = capture(path, ids)
    hf_rec = Recorder()
    hf = run_transformers(path, ids, hf_rec), hf_rec
    assert capfd.readouterr() == ("", "")  # neither runtime prints
    has_bias = arch == "qwen2"
    assert llama[0].qk_layout is (QKLayout.INTERLEAVED if arch == "llama" else QKLayout.HF)
    assert llama[0].unavailable == (Stage.FFN_SILU,)
    assert llama[1].order == expected_order(m.layers, qkv_bias=has_bias, lacking={Stage.FFN_SILU})
    assert hf_rec.order == expected_order(m.layers, qkv_bias=has_bias, lacking=set())
    for sid, a in llama[1].arrays.items():
        assert a.shape == canonical_shape(sid.stage, len(ids), m), sid
    worst = compare(llama, hf, m)
    assert all(err < 1e-5 for err, _, _ in worst.values()), worst


def test_tables_that_do_not_fit_the_graph(tmp_path: Path) -> None:
    """A node table or stage list that does not fit the graph is a one-line error, or a stage listed as
    unavailable with the reason; never a quietly wrong trace."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    stages = model_stages(qkv_bias=False)
    with pytest.raises(InferenceError, match="^llama.cpp exposed ffn_norm, which the model's stage graph"):
        run_llamacpp(path, [1, 2], Recorder(), expected=[s for s in stages if s is not Stage.FFN_NORM])
    wrong = {**LLAMA_NODES, "kqv": Stage.ATTN_SCORES}  # not what the SOFT_MAX reads: unavailable, why
    del wrong["kq"]
    run = run_llamacpp(path, [1, 2], Recorder(), nodes=wrong)
    assert run.unavailable == (Stage.ATTN_SCORES, Stage.FFN_SILU)
    assert "attn_scores: the SOFT_MAX reads kq-0, which the node table does not map to it" in run.notes
    bare = {**LLAMA_NODES, "embd": Stage.FFN_OUT}  # a per-layer stage on a bare name before any layer
    with pytest.raises(InferenceError, match=r"^llama.cpp node embd \(ffn_out\) comes before any layer$"):
        run_llamacpp(path, [1, 2], Recorder(), nodes=bare)


def test_runs_repeat_bit_for_bit(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen2")
    (_, a), (_, b) = capture(path, (1, 2, 3)), capture(path, (1, 2, 3))
    assert a.order == b.order
    for sid, x in a.arrays.items():
        np.testing.assert_array_equal(x, b.arrays[sid])


def test_broken_model_is_one_line_and_silent(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError) as e:
        run_llamacpp(bad, [1], Recorder())
    cause = "invalid magic characters: 'not ', expected 'GGUF'"
    assert str(e.value) == f"llama.cpp could not load {bad}: {cause}"
    assert capfd.readouterr() == ("", "")
    # llama-cpp-python's own log callback is back in place afterwards
    current, user_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(current), ctypes.byref(user_data))
    own = importlib.import_module("llama_cpp._logger").llama_log_callback
    assert ctypes.cast(current, ctypes.c_void_p).value == ctypes.cast(own, ctypes.c_void_p).value


def test_bad_arguments(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    with pytest.raises(NotFoundError, match="^model not found: .*nowhere.gguf$"):
        run_llamacpp(tmp_path / "nowhere.gguf", [1], Recorder())
    with pytest.raises(ValidationError, match=r"^token id 257 is outside the vocabulary \(size 257\)$"):
        run_llamacpp(path, [1, 257], Recorder())
    with pytest.raises(ValidationError, match="^n_threads must be >= 1, got 0$"):
        run_llamacpp(path, [1], Recorder(), n_threads=0)


def test_refuses_other_llama_cpp_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama_cpp, "__version__", "0.3.37")
    with pytest.raises(FeatureDisabledError) as e:
        llamacpp_ggml.bind.__wrapped__()
    assert str(e.value) == (
        "--engine llama.cpp (apr reads ggml structs of llama-cpp-python 0.3.36 exactly; 0.3.37 is "
        f"installed) needs the optional extra {HINT}"
    )


def test_without_llama_cpp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(FeatureDisabledError) as e:
        llamacpp_ggml.bind.__wrapped__()
    assert str(e.value) == f"--engine llama.cpp needs the optional extra {HINT}"
