"""Phi-3: the llama decoder with fused projections — one [Q|K|V] matrix and one [gate|up] matrix.

HF stores `qkv_proj` and `gate_up_proj`; llama.cpp's converter keeps them fused as `attn_qkv` and
`ffn_up` (2·I rows, gate first). The tensor table maps the canonical q/k/v and gate/up roles to row ranges of
those (models/base.py `TensorRole.rows`), so the math is the llama family's, unchanged. RoPE is NEOX (rows in
HF order in both formats). Sliding window: transformers applies `sliding_window`; llama.cpp disables it for
Phi-3 ("Phi SWA is currently disabled"), so a GGUF trace follows llama.cpp and uses none. LongRoPE
(`rope_scaling` type longrope, GGUF rope_factors_long/short) is refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from apr.formats.base import ConfigSource
from apr.models import common, llama, sources
from apr.models.base import ROPE_NEOX, Family, HookMap, Ignorable, TensorRole, Variant
from apr.models.config import ModelConfig
from apr.models.params import COMMON, Param
from apr.stages import Stage

VARIANTS: Final = (Variant("phi3", ("phi3",), ("Phi3ForCausalLM",), ROPE_NEOX),)
PARAMS: Final = (
    *COMMON,
    Param("sliding_window", None, ("sliding_window",), default=0, check="nonneg"),
)
IN, OUT = common.IN, common.OUT


def finish(
    variant: Variant, source: ConfigSource, values: Mapping[str, Any], present: frozenset[str], where: str
) -> ModelConfig:
    return ModelConfig(
        architecture=variant.name,
        family="phi3",
        vocab_size=sources.vocab_size(source, present, where),
        tied_embeddings=sources.tied_embeddings(source, present),
        qk_layout=sources.qk_layout(variant, source, where),
        rope_scaling=sources.rope_scaling(source, False, where),
        **values,  # sliding_window comes from HF only: llama.cpp reads the GGUF key, then disables SWA
    )


def roles(c: ModelConfig) -> tuple[TensorRole, ...]:
    D, ffn, q, kv = c.hidden_size, c.intermediate_size, c.q_dim, c.kv_dim
    layer = "model.layers.{i}."
    qkv, gate_up = layer + "self_attn.qkv_proj.weight", layer + "mlp.gate_up_proj.weight"
    fused_qkv, fused_ffn = "blk.{i}.attn_qkv.weight", "blk.{i}.ffn_up.weight"
    return (
        *common.global_roles(c),
        TensorRole("blk.{i}.attn_norm.weight", layer + "input_layernorm.weight", lambda _: (D,)),
        TensorRole("blk.{i}.attn_q.weight", qkv, lambda _: (q, D), gguf=fused_qkv, rows=lambda _: (0, q)),
        TensorRole(
            "blk.{i}.attn_k.weight", qkv, lambda _: (kv, D), gguf=fused_qkv, rows=lambda _: (q, q + kv)
        ),
        TensorRole(
            "blk.{i}.attn_v.weight",
            qkv,
            lambda _: (kv, D),
            gguf=fused_qkv,
            rows=lambda _: (q + kv, q + 2 * kv),
        ),
        TensorRole("blk.{i}.attn_output.weight", layer + "self_attn.o_proj.weight", lambda _: (D, q)),
        TensorRole("blk.{i}.ffn_norm.weight", layer + "post_attention_layernorm.weight", lambda _: (D,)),
        TensorRole(
            "blk.{i}.ffn_gate.weight", gate_up, lambda _: (ffn, D), gguf=fused_ffn, rows=lambda _: (0, ffn)
        ),
        TensorRole(
            "blk.{i}.ffn_up.weight",
            gate_up,
            lambda _: (ffn, D),
            gguf=fused_ffn,
            rows=lambda _: (ffn, 2 * ffn),
        ),
        TensorRole("blk.{i}.ffn_down.weight", layer + "mlp.down_proj.weight", lambda _: (D, ffn)),
    )


LAYER_HOOKS: Final = (
    ("input_layernorm", OUT, Stage.ATTN_NORM),
    ("self_attn.qkv_proj", OUT, Stage.QKV_MATMUL),
    ("self_attn.o_proj", IN, Stage.ATTENTION),
    ("self_attn.o_proj", OUT, Stage.ATTN_OUT),
    ("post_attention_layernorm", IN, Stage.POST_ATTN_RESIDUAL),
    ("post_attention_layernorm", OUT, Stage.FFN_NORM),
    ("mlp.gate_up_proj", "out:0/2", Stage.FFN_GATE),
    ("mlp.gate_up_proj", "out:1/2", Stage.FFN_UP),
    ("mlp.activation_fn", OUT, Stage.FFN_SILU),
    ("mlp.down_proj", IN, Stage.FFN_SWIGL),
    ("mlp.down_proj", OUT, Stage.FFN_OUT),
    ("", OUT, Stage.POST_FFN_RESIDUAL),
)
# build_qkv's fused path: Qcur/Kcur/Vcur are views of one MUL_MAT; ffn_up is [gate|up] (its halves)
GGML_NODES: Final = {
    **common.LLAMA_NODES,
    "wqkv": Stage.QKV_MATMUL,
    "wqkv_b": Stage.QKV_BIAS,
}

FAMILY: Final = Family(
    name="phi3",
    variants=VARIANTS,
    params=PARAMS,
    finish=finish,
    roles=roles,
    graph=llama.graph,
    forward=llama.DECODER.forward,
    layer=llama.DECODER.layer,
    hooks=HookMap(LAYER_HOOKS, common.MODEL_HOOKS, qkv=()),
    ggml_nodes=GGML_NODES,
    ignorable=(Ignorable(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", "RoPE buffer, recomputed"),),
    gguf_keys=(*sources.ROPE_GGUF_KEYS, "{arch}.attention.sliding_window"),
    hf_refuse={
        "hidden_act": lambda v: None if v == "silu" else f"activation {v!r} (Phi-3 computes SiLU)",
        **sources.HF_REFUSE,
    },
)
