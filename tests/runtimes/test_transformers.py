"""The transformers runtime: every stage, canonical shapes, forward order, hooks where the stages say."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from apr.errors import FeatureDisabledError, ModelLoadError, NotFoundError, ValidationError
from apr.formats.config import QKLayout
from apr.runtimes import run_transformers
from apr.stages import Stage, StageId
from apr.version import __version__
from tests.runtimes import (
    PROMPT_IDS,
    SMOLLM2,
    Dims,
    Recorder,
    canonical_shape,
    expected_order,
    rel_err,
    transformers_run,
)

pytestmark = pytest.mark.oracle

TINY = Dims(d=32, h=4, hkv=2, dh=8, i=48, v=64, layers=2)
TINY_IDS = (3, 17, 42, 5, 60)


@pytest.fixture(scope="module")
def smollm2(smollm2_f32_gguf: Path) -> tuple[object, Recorder]:
    return transformers_run(smollm2_f32_gguf, PROMPT_IDS)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random 2-layer HF folders (config.json + model.safetensors): llama, qwen2 (q/k/v bias), qwen3."""
    common = {
        "hidden_size": TINY.d,
        "num_attention_heads": TINY.h,
        "num_key_value_heads": TINY.hkv,
        "head_dim": TINY.dh,
        "intermediate_size": TINY.i,
        "vocab_size": TINY.v,
        "num_hidden_layers": TINY.layers,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
    }
    configs = {
        "llama": transformers.LlamaConfig(**common),
        "qwen2": transformers.Qwen2Config(**common),
        "qwen3": transformers.Qwen3Config(**common),
        "gpt2": transformers.GPT2Config(
            n_embd=32, n_layer=1, n_head=4, vocab_size=64, bos_token_id=0, eos_token_id=0
        ),
    }
    out = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # make the biases and norms non-trivial
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        out[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(out[name])
    return out


def test_smollm2_run_record(smollm2: tuple[object, Recorder]) -> None:
    run, _ = smollm2
    assert run.engine == "transformers"
    assert run.engine_version.startswith(f"transformers {transformers.__version__} / torch ")
    assert run.token_ids == PROMPT_IDS
    assert run.qk_layout is QKLayout.HF
    assert run.unavailable == ()
    assert run.settings["architecture"] == "LlamaForCausalLM"
    assert run.settings["dtype"] == "float32"
    assert "qkv_bias: not applicable, the model has no q/k/v bias" in run.notes


def test_smollm2_every_stage_every_layer_in_forward_order(smollm2: tuple[object, Recorder]) -> None:
    _, rec = smollm2
    assert rec.order == expected_order(SMOLLM2.layers, qkv_bias=False, lacking=set())
    for sid, a in rec.arrays.items():
        assert a.dtype == np.float32, sid
        assert a.shape == canonical_shape(sid.stage, len(PROMPT_IDS), SMOLLM2), sid
        assert np.isfinite(a).all(), sid


def test_smollm2_stages_relate_as_the_forward_does(smollm2: tuple[object, Recorder]) -> None:
    """Each hook sits where its stage says: the residual adds, the SwiGLU product, the causal softmax."""
    _, rec = smollm2
    a = rec.arrays
    prev = a[StageId(Stage.EMBEDDING, 0)]
    for i in range(SMOLLM2.layers):
        mid = a[StageId(Stage.POST_ATTN_RESIDUAL, i)]
        out = a[StageId(Stage.POST_FFN_RESIDUAL, i)]
        np.testing.assert_array_equal(mid, prev + a[StageId(Stage.ATTN_OUT, i)])
        np.testing.assert_array_equal(out, mid + a[StageId(Stage.FFN_OUT, i)])
        silu, up = a[StageId(Stage.FFN_SILU, i)], a[StageId(Stage.FFN_UP, i)]
        np.testing.assert_array_equal(a[StageId(Stage.FFN_SWIGL, i)], silu * up)
        gate = a[StageId(Stage.FFN_GATE, i)].astype(np.float64)
        np.testing.assert_allclose(silu, gate / (1 + np.exp(-gate)), rtol=1e-5, atol=1e-6)
        # RoPE at position 0 is the identity: Q and K there equal the projections
        qkv = a[StageId(Stage.QKV_MATMUL, i)]
        q_dim = SMOLLM2.h * SMOLLM2.dh
        np.testing.assert_array_equal(a[StageId(Stage.Q_POST_ROPE, i)][0], qkv[0, :q_dim])
        scores, probs = a[StageId(Stage.ATTN_SCORES, i)], a[StageId(Stage.ATTN_SOFTMAX, i)]
        upper = np.triu(np.ones(scores.shape[1:], dtype=bool), k=1)
        assert (scores[:, upper] == 0).all() and (probs[:, upper] == 0).all()
        masked = np.where(upper, -np.inf, scores.astype(np.float64))
        expect = np.exp(masked - masked.max(-1, keepdims=True))
        np.testing.assert_allclose(probs, expect / expect.sum(-1, keepdims=True), atol=1e-6)
        prev = out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_hf_folder_gives_every_stage(arch: str, tiny_models: dict[str, Path]) -> None:
    rec = Recorder()
    run = run_transformers(tiny_models[arch], TINY_IDS, rec)
    has_bias = arch == "qwen2"
    assert run.unavailable == ()
    assert run.settings["architecture"] == f"{arch.capitalize()}ForCausalLM"
    assert rec.order == expected_order(TINY.layers, qkv_bias=has_bias, lacking=set())
    for sid, a in rec.arrays.items():
        assert a.shape == canonical_shape(sid.stage, len(TINY_IDS), TINY), sid
    if has_bias:  # qkv_bias is the projections' output, qkv_matmul the same without the bias
        from safetensors.numpy import load_file

        w = load_file(tiny_models[arch] / "model.safetensors")
        bias = np.concatenate([w[f"model.layers.0.self_attn.{p}_proj.bias"] for p in "qkv"])
        diff = rec.arrays[StageId(Stage.QKV_BIAS, 0)] - rec.arrays[StageId(Stage.QKV_MATMUL, 0)]
        np.testing.assert_allclose(diff, np.broadcast_to(bias, diff.shape), atol=1e-6)
        assert any(n.startswith("qkv_matmul: x·Wᵀ recomputed by torch") for n in run.notes)


def test_float64_run_agrees_with_float32(tiny_models: dict[str, Path]) -> None:
    r32, r64 = Recorder(), Recorder()
    run_transformers(tiny_models["qwen3"], TINY_IDS, r32)
    run = run_transformers(tiny_models["qwen3"], TINY_IDS, r64, dtype="float64")
    assert run.settings["dtype"] == "float64"
    assert r64.order == r32.order
    for sid, a in r64.arrays.items():
        assert a.dtype == np.float64  # a true float64 reference reaches the tap in float64
        assert rel_err(r32.arrays[sid], a) < 1e-5, sid
    assert any(
        n.startswith("float64: RMSNorm, RoPE angles and the eager softmax run in float64") for n in run.notes
    )


def test_unsupported_architecture(tiny_models: dict[str, Path]) -> None:
    path = tiny_models["gpt2"]
    with pytest.raises(ModelLoadError) as e:
        run_transformers(path, TINY_IDS, Recorder())
    assert (
        str(e.value)
        == f"transformers runtime traces decoder models (model.layers); {path} is a GPT2LMHeadModel"
    )


def test_missing_and_broken_models(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="^model not found: .*nowhere.gguf$"):
        run_transformers(tmp_path / "nowhere.gguf", [1], Recorder())
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError) as e:
        run_transformers(bad, [1], Recorder())
    assert str(e.value).startswith(f"transformers could not load {bad}: ")
    assert "\n" not in str(e.value)


def test_bad_arguments(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(ValidationError, match="^unsupported dtype 'float16'; choose one of float32"):
        run_transformers(tiny_models["llama"], TINY_IDS, Recorder(), dtype="float16")
    with pytest.raises(ValidationError, match=r"^token id 64 is outside the vocabulary \(size 64\)$"):
        run_transformers(tiny_models["llama"], [1, 64], Recorder())
    with pytest.raises(ValidationError, match="^no token ids to run$"):
        run_transformers(tiny_models["llama"], [], Recorder())


def test_without_transformers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(FeatureDisabledError) as e:
        run_transformers(tmp_path, [1], Recorder())
    assert str(e.value) == (
        "--engine transformers needs the optional extra [transformers]: from a checkout, pip install -e "
        "'.[transformers]' (make dev installs every extra); from a wheel, pip install "
        f"'apr-{__version__}-py3-none-any.whl[transformers]'"
    )
