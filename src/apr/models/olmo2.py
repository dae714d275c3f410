"""OLMo 2: norms after each sublayer instead of before, and QK-norm over the whole projection.

    per layer:  q, k = rmsnorm(x·Wq), rmsnorm(x·Wk)  (over H·Dh and Hkv·Dh, before the head split);  v = x·Wv
                x = x + rmsnorm(attention(q, k, v)·Wo);   x = x + rmsnorm(ffn(x))      (SwiGLU, no pre-norm)
    logits = rmsnorm(x)·Wout

So the layer has no attn_norm / ffn_norm stages: q/k/v read the layer input, the FFN reads the residual.
RoPE is NEOX (HF row order in both formats). Legend: T tokens, D hidden, I ffn width.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import numpy.typing as npt

from apr.engine import ops
from apr.engine.weights import Weights
from apr.formats.base import ConfigSource
from apr.models import common, decoder, sources
from apr.models.base import PREV_OUTPUT, ROPE_NEOX, Family, HookMap, StageNode, TensorRole, Variant
from apr.models.config import ModelConfig
from apr.models.params import COMMON
from apr.stages import Stage, Tap

Array = npt.NDArray[Any]
IN, OUT = common.IN, common.OUT
VARIANTS: Final = (Variant("olmo2", ("olmo2",), ("Olmo2ForCausalLM",), ROPE_NEOX),)


def finish(
    variant: Variant, source: ConfigSource, values: Mapping[str, Any], present: frozenset[str], where: str
) -> ModelConfig:
    return ModelConfig(
        architecture=variant.name,
        family="olmo2",
        vocab_size=sources.vocab_size(source, present, where),
        qk_norm=True,
        tied_embeddings=sources.tied_embeddings(source, present),
        qk_layout=sources.qk_layout(variant, source, where),
        rope_scaling=sources.rope_scaling(source, False, where),
        **values,
    )


def roles(c: ModelConfig) -> tuple[TensorRole, ...]:
    D, q, kv = c.hidden_size, c.q_dim, c.kv_dim
    layer = "model.layers.{i}."
    return (
        *common.global_roles(c),
        *common.attention_roles(c),
        TensorRole("blk.{i}.attn_q_norm.weight", layer + "self_attn.q_norm.weight", lambda _: (q,)),
        TensorRole("blk.{i}.attn_k_norm.weight", layer + "self_attn.k_norm.weight", lambda _: (kv,)),
        TensorRole(
            "blk.{i}.post_attention_norm.weight", layer + "post_attention_layernorm.weight", lambda _: (D,)
        ),
        *common.swiglu_roles(D, c.intermediate_size),
        TensorRole(
            "blk.{i}.post_ffw_norm.weight", layer + "post_feedforward_layernorm.weight", lambda _: (D,)
        ),
    )


def graph(c: ModelConfig) -> tuple[StageNode, ...]:
    return (
        StageNode(Stage.EMBEDDING, (), ("token_embd.weight",)),
        *common.attention_nodes(c, PREV_OUTPUT),
        StageNode(
            Stage.ATTN_POST_NORM, (Stage.ATTN_OUT,), ("blk.{i}.post_attention_norm.weight",), norm=True
        ),
        StageNode(Stage.POST_ATTN_RESIDUAL, (Stage.ATTN_POST_NORM, PREV_OUTPUT)),
        *common.swiglu_nodes(Stage.POST_ATTN_RESIDUAL),
        StageNode(Stage.FFN_POST_NORM, (Stage.FFN_OUT,), ("blk.{i}.post_ffw_norm.weight",), norm=True),
        StageNode(Stage.POST_FFN_RESIDUAL, (Stage.FFN_POST_NORM, Stage.POST_ATTN_RESIDUAL)),
        *common.head_nodes(),
    )


def block(w: Weights, cfg: ModelConfig, i: int, x: Array, tap: Tap, rot: decoder.Rotary) -> Array:
    """Decoder layer i: (T, D) → (T, D)."""
    p, emit = decoder.layer_names(i), decoder.emitter(tap, i)
    # attention on the layer input (QK-norm over the whole projection), then its norm
    o = decoder.attention(w, cfg, i, x, emit, rot, qk_norm_full=True)  # (T, D)
    o = ops.rms_norm(o, w.vector(p("post_attention_norm.weight")), cfg.rms_eps)  # (T, D)
    emit(Stage.ATTN_POST_NORM, o)
    x = x + o  # (T, D)
    emit(Stage.POST_ATTN_RESIDUAL, x)
    # feed-forward (SwiGLU) on the residual, then its norm
    f = decoder.swiglu(w, i, x, emit, ops.silu)  # (T, D)
    f = ops.rms_norm(f, w.vector(p("post_ffw_norm.weight")), cfg.rms_eps)  # (T, D)
    emit(Stage.FFN_POST_NORM, f)
    x = x + f  # (T, D)
    emit(Stage.POST_FFN_RESIDUAL, x)
    return x


DECODER: Final = decoder.Decoder(block)


LAYER_HOOKS: Final = (
    ("self_attn.o_proj", IN, Stage.ATTENTION),
    ("self_attn.o_proj", OUT, Stage.ATTN_OUT),
    ("post_attention_layernorm", OUT, Stage.ATTN_POST_NORM),
    ("mlp", IN, Stage.POST_ATTN_RESIDUAL),
    ("mlp.gate_proj", OUT, Stage.FFN_GATE),
    ("mlp.up_proj", OUT, Stage.FFN_UP),
    ("mlp.act_fn", OUT, Stage.FFN_SILU),
    ("mlp.down_proj", IN, Stage.FFN_SWIGL),
    ("mlp.down_proj", OUT, Stage.FFN_OUT),
    ("post_feedforward_layernorm", OUT, Stage.FFN_POST_NORM),
    ("", OUT, Stage.POST_FFN_RESIDUAL),
)
GGML_NODES: Final = {
    **{k: v for k, v in common.LLAMA_NODES.items() if k not in ("attn_norm", "ffn_norm")},
    "attn_post_norm": Stage.ATTN_POST_NORM,
    "ffn_post_norm": Stage.FFN_POST_NORM,  # named with il = -1 (bare)
}

FAMILY: Final = Family(
    name="olmo2",
    variants=VARIANTS,
    params=COMMON,
    finish=finish,
    roles=roles,
    graph=graph,
    forward=DECODER.forward,
    layer=DECODER.layer,
    hooks=HookMap(LAYER_HOOKS, common.MODEL_HOOKS),
    ggml_nodes=GGML_NODES,
    gguf_keys=sources.ROPE_GGUF_KEYS,
    hf_refuse={
        "hidden_act": lambda v: None if v == "silu" else f"activation {v!r} (OLMo 2 computes SiLU)",
        "attention_bias": lambda v: "attention biases (attention_bias: true)" if v else None,
        **sources.HF_REFUSE,
    },
)
