"""The llama family: Llama 1–3.x, Mistral, Qwen2, Qwen3, Granite — one decoder, its variants as config.

    x = embed(ids) · embed_scale
    per layer:  h = rmsnorm(x);  q,k,v = h·Wq,k,v (+ bias: Qwen2);  q,k = rmsnorm per head (Qwen3)
                q,k = rope(q,k) (scaling: linear / llama3 / yarn)
                a = softmax(q·kᵀ·scale, causal[, window])·v
                x = x + residual_scale · a·Wo;   h = rmsnorm(x)
                x = x + residual_scale · (silu(h·Wg) ⊙ h·Wu)·Wd
    logits = rmsnorm(x)·Wout / logit_divisor

Variants differ only in flags: Qwen2's q/k/v bias and Qwen3's QK-norm follow from the tensors; Mistral's
sliding window, Granite's multipliers and Llama 3's RoPE scaling from the config. Legend: T tokens, D hidden,
H query heads, Hkv kv heads, Dh head dim, I ffn width, V vocab.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import numpy.typing as npt

from apr.engine import ops
from apr.engine.weights import Weights
from apr.formats.base import ConfigSource
from apr.formats.config import QKLayout
from apr.models import common, decoder, sources
from apr.models.base import (
    OPTIONAL,
    PREV_OUTPUT,
    ROPE_NEOX,
    ROPE_NORM,
    Family,
    HookMap,
    Ignorable,
    StageNode,
    TensorRole,
    Variant,
)
from apr.models.config import ModelConfig
from apr.models.params import COMMON, Param
from apr.stages import Stage, Tap

Array = npt.NDArray[Any]
ROPE = {QKLayout.HF: ops.rope_half_split, QKLayout.INTERLEAVED: ops.rope_adjacent}

VARIANTS: Final = (
    Variant("llama", ("llama",), ("LlamaForCausalLM",), ROPE_NORM),
    Variant("mistral", (), ("MistralForCausalLM",), ROPE_NORM),  # its GGUF says "llama"
    Variant("qwen2", ("qwen2",), ("Qwen2ForCausalLM",), ROPE_NEOX, apr_hf_names=True),
    Variant("qwen3", ("qwen3",), ("Qwen3ForCausalLM",), ROPE_NEOX, apr_hf_names=True),
    Variant("granite", ("granite",), ("GraniteForCausalLM",), ROPE_NORM),
)

PARAMS: Final = (
    *COMMON,
    Param(
        "sliding_window", "{arch}.attention.sliding_window", ("sliding_window",), default=0, check="nonneg"
    ),
    Param("embed_scale", "{arch}.embedding_scale", ("embedding_multiplier",), kind=float, default=1.0),
    Param("residual_scale", "{arch}.residual_scale", ("residual_multiplier",), kind=float, default=1.0),
    Param(
        "attn_scale",
        "{arch}.attention.scale",
        ("attention_multiplier",),
        kind=float,
        default=0.0,
        check="nonneg",
    ),
    Param("logit_divisor", "{arch}.logit_scale", ("logits_scaling",), kind=float, default=1.0),
)


def finish(
    variant: Variant, source: ConfigSource, values: Mapping[str, Any], present: frozenset[str], where: str
) -> ModelConfig:
    window = values["sliding_window"]
    if source.kind == "hf" and source.get("use_sliding_window") is False:
        window = 0  # Qwen2/3 store a window they do not use
    return ModelConfig(
        architecture=variant.name,
        family="llama",
        vocab_size=sources.vocab_size(source, present, where),
        qkv_bias="blk.{i}.attn_q.bias" in present,
        qk_norm="blk.{i}.attn_q_norm.weight" in present,
        tied_embeddings=sources.tied_embeddings(source, present),
        qk_layout=sources.qk_layout(variant, source, where),
        rope_scaling=sources.rope_scaling(source, "rope_freqs.weight" in present, where),
        **{**values, "sliding_window": window},
    )


def roles(c: ModelConfig) -> tuple[TensorRole, ...]:
    D, Dh = c.hidden_size, c.head_dim
    q, kv = c.q_dim, c.kv_dim
    return (
        *common.global_roles(c),
        TensorRole("rope_freqs.weight", "", lambda c: (c.head_dim // 2,), OPTIONAL),
        TensorRole("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight", lambda _: (D,)),
        *common.attention_roles(c),
        TensorRole(
            "blk.{i}.attn_q_norm.weight",
            "model.layers.{i}.self_attn.q_norm.weight",
            lambda _: (Dh,),
            OPTIONAL,
        ),
        TensorRole(
            "blk.{i}.attn_k_norm.weight",
            "model.layers.{i}.self_attn.k_norm.weight",
            lambda _: (Dh,),
            OPTIONAL,
        ),
        TensorRole("blk.{i}.attn_q.bias", "model.layers.{i}.self_attn.q_proj.bias", lambda _: (q,), OPTIONAL),
        TensorRole(
            "blk.{i}.attn_k.bias", "model.layers.{i}.self_attn.k_proj.bias", lambda _: (kv,), OPTIONAL
        ),
        TensorRole(
            "blk.{i}.attn_v.bias", "model.layers.{i}.self_attn.v_proj.bias", lambda _: (kv,), OPTIONAL
        ),
        TensorRole(
            "blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", lambda _: (D,)
        ),
        *common.swiglu_roles(D, c.intermediate_size),
    )


def graph(c: ModelConfig) -> tuple[StageNode, ...]:
    return (
        StageNode(Stage.EMBEDDING, (), ("token_embd.weight",)),
        StageNode(Stage.ATTN_NORM, (PREV_OUTPUT,), ("blk.{i}.attn_norm.weight",), norm=True),
        *common.attention_nodes(c, Stage.ATTN_NORM),
        StageNode(Stage.POST_ATTN_RESIDUAL, (Stage.ATTN_OUT, PREV_OUTPUT)),
        StageNode(Stage.FFN_NORM, (Stage.POST_ATTN_RESIDUAL,), ("blk.{i}.ffn_norm.weight",), norm=True),
        *common.swiglu_nodes(Stage.FFN_NORM),
        StageNode(Stage.POST_FFN_RESIDUAL, (Stage.FFN_OUT, Stage.POST_ATTN_RESIDUAL)),
        *common.head_nodes(),
    )


def block(w: Weights, cfg: ModelConfig, i: int, x: Array, tap: Tap, rot: decoder.Rotary) -> Array:
    """Decoder layer i: (T, D) → (T, D)."""
    p, emit = decoder.layer_names(i), decoder.emitter(tap, i)
    r = x.dtype.type(cfg.residual_scale)
    # attention norm
    h = ops.rms_norm(x, w.vector(p("attn_norm.weight")), cfg.rms_eps)  # (T, D)
    emit(Stage.ATTN_NORM, h)
    # self-attention (q/k/v, bias, QK-norm, RoPE, causal softmax, O-projection)
    o = decoder.attention(w, cfg, i, h, emit, rot)  # (T, D)
    x = x + r * o  # (T, D)
    emit(Stage.POST_ATTN_RESIDUAL, x)
    # feed-forward (SwiGLU)
    h = ops.rms_norm(x, w.vector(p("ffn_norm.weight")), cfg.rms_eps)  # (T, D)
    emit(Stage.FFN_NORM, h)
    f = decoder.swiglu(w, i, h, emit, ops.silu)  # (T, D)
    x = x + r * f  # (T, D)
    emit(Stage.POST_FFN_RESIDUAL, x)
    return x


DECODER: Final = decoder.Decoder(block)


def _refuse_act(v: Any) -> str | None:
    return None if v == "silu" else f"activation {v!r} (the llama family computes SiLU)"


FAMILY: Final = Family(
    name="llama",
    variants=VARIANTS,
    params=PARAMS,
    finish=finish,
    roles=roles,
    graph=graph,
    forward=DECODER.forward,
    layer=DECODER.layer,
    hooks=HookMap(common.LLAMA_LAYER_HOOKS, common.MODEL_HOOKS),
    ggml_nodes=common.LLAMA_NODES,
    ignorable=(Ignorable(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", "RoPE buffer, recomputed"),),
    gguf_keys=sources.ROPE_GGUF_KEYS,
    hf_refuse={
        "hidden_act": _refuse_act,
        "mlp_bias": lambda v: "MLP biases (mlp_bias: true)" if v else None,
        "use_sliding_window": lambda v: (
            "Qwen's per-layer sliding window (use_sliding_window: true)" if v else None
        ),
        **sources.HF_REFUSE,
    },
)
