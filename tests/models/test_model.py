"""Family resolution and strict accounting: what apr does not fully understand is refused, by name.

Each refusal rule of the architecture-family design has a test on a real file: an HF folder written with the
`safetensors` package, a GGUF written with gguf's GGUFWriter, an .apr written by apr's writer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from apr.errors import FormatError, ModelLoadError
from apr.formats.aprwrite import AprTensor, metadata_for, write_apr
from apr.formats.config import QKLayout
from apr.models import open_model
from apr.models.exchange import apr_keys_of
from apr.models.registry import stage_graph
from apr.stages import Stage

D, FFN, H, HKV, DH, V, L = 16, 24, 4, 2, 4, 32, 2
CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": D,
    "intermediate_size": FFN,
    "num_hidden_layers": L,
    "num_attention_heads": H,
    "num_key_value_heads": HKV,
    "vocab_size": V,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 64,
    "hidden_act": "silu",
}


def hf_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(L):
        p = f"model.layers.{i}."
        t |= {
            p + "input_layernorm.weight": (D,),
            p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (H * DH, D),
            p + "self_attn.k_proj.weight": (HKV * DH, D),
            p + "self_attn.v_proj.weight": (HKV * DH, D),
            p + "self_attn.o_proj.weight": (D, H * DH),
            p + "mlp.gate_proj.weight": (FFN, D),
            p + "mlp.up_proj.weight": (FFN, D),
            p + "mlp.down_proj.weight": (D, FFN),
        }
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in t.items()}


def hf_folder(tmp_path: Path, tensors: dict[str, np.ndarray] | None = None, **config: Any) -> Path:
    d = tmp_path / "hf"
    d.mkdir(exist_ok=True)
    save_file(hf_tensors() if tensors is None else tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(CONFIG | config))
    return d


def test_hf_llama_resolves_with_canonical_names(tmp_path: Path) -> None:
    m = open_model(hf_folder(tmp_path))
    assert (m.family.name, m.config.architecture, m.config.qk_layout) == ("llama", "llama", QKLayout.HF)
    assert m.info("blk.1.attn_q.weight").source_name == "model.layers.1.self_attn.q_proj.weight"
    assert len(m.tensors()) == len(hf_tensors()) and m.ignored == []
    assert Stage.QKV_BIAS not in m.stages() and Stage.ATTN_POST_NORM not in m.stages()


def test_unknown_tensor_is_refused_by_name(tmp_path: Path) -> None:
    t = hf_tensors() | {"model.layers.0.mlp.extra_proj.weight": np.zeros((2, 2), np.float32)}
    with pytest.raises(ModelLoadError, match=r"tensor model\.layers\.0\.mlp\.extra_proj\.weight is not used"):
        open_model(hf_folder(tmp_path, t))


def test_ignorable_tensor_is_listed_with_its_reason(tmp_path: Path) -> None:
    t = hf_tensors() | {"model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(2, np.float32)}
    m = open_model(hf_folder(tmp_path, t))
    assert m.ignored == [("model.layers.0.self_attn.rotary_emb.inv_freq", "RoPE buffer, recomputed")]


def test_missing_and_partial_tensors(tmp_path: Path) -> None:
    t = hf_tensors()
    del t["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ModelLoadError, match=r"tensor blk\.1\.ffn_up\.weight is missing \(present in 1 of 2"):
        open_model(hf_folder(tmp_path, t))
    t = hf_tensors() | {"model.layers.0.self_attn.q_proj.bias": np.zeros(H * DH, np.float32)}
    with pytest.raises(ModelLoadError, match=r"blk\.1\.attn_q\.bias is missing \(present in 1 of 2 layers\)"):
        open_model(hf_folder(tmp_path, t))


def test_shape_contradicting_the_config_is_refused(tmp_path: Path) -> None:
    t = hf_tensors() | {"model.layers.1.mlp.down_proj.weight": np.zeros((D, FFN + 1), np.float32)}
    with pytest.raises(
        FormatError, match=r"down_proj\.weight has shape \[16, 25\]; the config needs \[16, 24\]"
    ):
        open_model(hf_folder(tmp_path, t))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
            "rope scaling type 'dynamic' is not implemented",
        ),
        (
            {
                "rope_scaling": {
                    "rope_type": "yarn",
                    "factor": 2.0,
                    "original_max_position_embeddings": 8,
                    "mscale": 0.7,
                }
            },
            "rope scaling 'mscale' = 0.7 is not implemented",
        ),
        ({"hidden_act": "gelu"}, "config 'hidden_act' = 'gelu': activation 'gelu'"),
        ({"final_logit_softcapping": 30.0}, "final logit soft-capping"),
        ({"architectures": ["FalconForCausalLM"]}, "architecture 'FalconForCausalLM' is not supported"),
        ({"num_key_value_heads": 3}, "4 attention heads are not a multiple of 3 key/value heads"),
        ({"num_attention_heads": 0}, "config key 'num_attention_heads' must be > 0, got 0"),
        ({"hidden_size": "16"}, "config key 'hidden_size' must be an integer, got '16'"),
    ],
)
def test_config_apr_does_not_implement_is_refused(
    tmp_path: Path, config: dict[str, Any], message: str
) -> None:
    with pytest.raises((ModelLoadError, FormatError), match=message.replace("(", r"\(").replace(")", r"\)")):
        open_model(hf_folder(tmp_path, **config))


def test_apr_of_an_unknown_architecture_is_refused(tmp_path: Path) -> None:
    src = open_model(hf_folder(tmp_path))
    keys = apr_keys_of(src.config)
    meta = metadata_for(keys, None, shapes={})
    meta["architecture"] = meta["model_type"] = meta["model.architecture"] = "falcon"
    meta.pop("hf_architecture", None)
    out = tmp_path / "x.apr"
    write_apr(out, [AprTensor.from_array("token_embd.weight", np.zeros((V, D), np.float32))], meta)
    with pytest.raises(ModelLoadError, match=r"architecture 'falcon' is not supported"):
        open_model(out)


def gguf_file(
    tmp_path: Path,
    extra_key: tuple[str, int] | None = None,
    experts: int = 0,
    arch: str = "llama",
    extra_tensors: tuple[str, ...] = (),
    drop: tuple[str, ...] = (),
    kv: dict[str, Any] | None = None,
) -> Path:
    import gguf

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (kv or {}).items():
        w.add_key_value(key, *value)
    if f"{arch}.block_count" not in (kv or {}):
        w.add_block_count(L)
    w.add_embedding_length(D)
    if f"{arch}.feed_forward_length" not in drop:
        w.add_feed_forward_length(FFN)
    if f"{arch}.attention.head_count" not in (kv or {}):
        w.add_head_count(H)
    w.add_head_count_kv(HKV)
    w.add_context_length(64)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    if experts:
        w.add_expert_count(experts)
    if extra_key:
        w.add_uint32(*extra_key)
    names = {"token_embd.weight": (V, D), "output_norm.weight": (D,)}
    for i in range(L):
        names |= {
            f"blk.{i}.{n}": s
            for n, s in {
                "attn_norm.weight": (D,),
                "ffn_norm.weight": (D,),
                "attn_q.weight": (H * DH, D),
                "attn_k.weight": (HKV * DH, D),
                "attn_v.weight": (HKV * DH, D),
                "attn_output.weight": (D, H * DH),
                "ffn_gate.weight": (FFN, D),
                "ffn_up.weight": (FFN, D),
                "ffn_down.weight": (D, FFN),
            }.items()
        }
    shapes = {
        "attn_q.bias": (H * DH,),
        "attn_k.bias": (HKV * DH,),
        "attn_v.bias": (HKV * DH,),
        "attn_q_norm.weight": (DH,),
        "attn_k_norm.weight": (DH,),
    }
    for suffix in extra_tensors:
        names |= {f"blk.{i}.{suffix}": shapes[suffix] for i in range(L)}
    for n, s in names.items():
        w.add_tensor(n, np.ones(s, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_resolves_and_refuses_unknown_keys_and_experts(tmp_path: Path) -> None:
    m = open_model(gguf_file(tmp_path))
    assert (m.config.qk_layout, m.config.tied_embeddings, m.config.vocab_size) == (
        QKLayout.INTERLEAVED,
        True,
        V,
    )
    with pytest.raises(ModelLoadError, match=r"GGUF key 'llama\.attention\.mystery' is not understood"):
        open_model(gguf_file(tmp_path, ("llama.attention.mystery", 3)))
    with pytest.raises(FormatError, match=r"config key 'llama\.expert_used_count' is missing"):
        open_model(gguf_file(tmp_path, experts=4))  # a llama GGUF with experts is a Mixtral: the MoE family's


def test_stage_graph_of_bare_traces_has_every_aprender_stage() -> None:
    stages = {n.stage for n in stage_graph(None)}
    assert {Stage.QKV_BIAS, Stage.MOE_ROUTER, Stage.MOE_FFN_OUT, Stage.MOE_ROUTER_INDICES} <= stages


@pytest.mark.parametrize(
    ("arch", "extra", "layout", "flags"),
    [
        ("llama", (), QKLayout.INTERLEAVED, (False, False)),
        ("qwen2", ("attn_q.bias", "attn_k.bias", "attn_v.bias"), QKLayout.HF, (True, False)),
        ("qwen3", ("attn_q_norm.weight", "attn_k_norm.weight"), QKLayout.HF, (False, True)),
        ("granite", (), QKLayout.INTERLEAVED, (False, False)),
    ],
)
def test_gguf_config_flags_from_tensors(
    tmp_path: Path, arch: str, extra: tuple[str, ...], layout: QKLayout, flags: tuple[bool, bool]
) -> None:
    m = open_model(gguf_file(tmp_path, arch=arch, extra_tensors=extra))
    c = m.config
    assert (c.architecture, c.family, c.qk_layout, (c.qkv_bias, c.qk_norm)) == (arch, "llama", layout, flags)
    assert (Stage.QKV_BIAS in m.stages()) is flags[0]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"drop": ("llama.feed_forward_length",)},
            FormatError,
            "config key 'llama.feed_forward_length' is missing",
        ),
        (
            {"kv": {"llama.block_count": ("one", __import__("gguf").GGUFValueType.STRING)}},
            FormatError,
            "config key 'llama.block_count' must be an integer, got 'one'",
        ),
        (
            {"kv": {"llama.attention.head_count": (0, __import__("gguf").GGUFValueType.UINT32)}},
            FormatError,
            "config key 'llama.attention.head_count' must be > 0, got 0",
        ),
        ({"arch": "gemma"}, ModelLoadError, "architecture 'gemma' is not supported"),
    ],
)
def test_gguf_bad_config(tmp_path: Path, kwargs: dict[str, Any], error: type, message: str) -> None:
    path = gguf_file(tmp_path, **kwargs)
    with pytest.raises(error) as e:
        open_model(path)
    assert type(e.value) is error and str(e.value).startswith(f"{path}: {message}")
