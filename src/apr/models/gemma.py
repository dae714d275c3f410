"""The Gemma family: Gemma 2 and Gemma 3 (text), a norm sandwich around each sublayer.

    x = embed(ids) · sqrt(D)
    per layer:  h = norm(x);  a = attention(h)  (q·kᵀ·scale [→ cap·tanh(·/cap), Gemma 2] [window on sliding
                layers];  Gemma 3: per-head QK-norm, its own RoPE base on sliding layers)
                x = x + norm(a·Wo);   h = norm(x);   x = x + norm((gelu_tanh(h·Wg) ⊙ h·Wu)·Wd)
    logits = norm(x)·Wout  [→ cap·tanh(·/cap), Gemma 2]

Every norm is RMSNorm times (1 + w): HF checkpoints store w (`norm_offset` 1), llama.cpp's converter stores
1 + w in the GGUF (offset 0). The score scale is query_pre_attn_scalar^-½ in HF; llama.cpp ignores that key
and uses 1/sqrt(head_dim) (the GGUF does not store it), so a GGUF trace follows llama.cpp. Sliding layers:
HF `layer_types`; GGUF `sliding_window_pattern`, else llama.cpp's default pattern (2 for Gemma 2, 6 for
Gemma 3: every n-th layer is global). Legend: T tokens, D hidden, I ffn width.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

import numpy.typing as npt

from apr.engine import ops
from apr.engine.weights import Weights
from apr.errors import FormatError, ModelLoadError
from apr.formats.base import ConfigSource
from apr.models import common, decoder, sources
from apr.models.base import OPTIONAL, PREV_OUTPUT, ROPE_NEOX, Family, HookMap, StageNode, TensorRole, Variant
from apr.models.config import ModelConfig
from apr.models.params import COMMON, Param
from apr.stages import Stage, Tap

Array = npt.NDArray[Any]
IN, OUT = common.IN, common.OUT

VARIANTS: Final = (
    Variant("gemma2", ("gemma2",), ("Gemma2ForCausalLM",), ROPE_NEOX),
    Variant("gemma3", ("gemma3",), ("Gemma3ForCausalLM",), ROPE_NEOX, hf_model_type="gemma3_text"),
)
DEFAULT_PATTERN: Final = {"gemma2": 2, "gemma3": 6}  # llama.cpp's load_swa_pattern defaults
LAYER_TYPES: Final = {"sliding_attention": True, "full_attention": False}

PARAMS: Final = (
    *COMMON,
    Param(
        "attn_softcap",
        "{arch}.attn_logit_softcapping",
        ("attn_logit_softcapping",),
        kind=float,
        default=0.0,
        check="nonneg",
    ),
    Param(
        "final_softcap",
        "{arch}.final_logit_softcapping",
        ("final_logit_softcapping",),
        kind=float,
        default=0.0,
        check="nonneg",
    ),
    Param(
        "sliding_window", "{arch}.attention.sliding_window", ("sliding_window",), default=0, check="nonneg"
    ),
    Param(
        "rope_local_theta",
        "{arch}.rope.freq_base_swa",
        ("rope_parameters.sliding_attention.rope_theta", "rope_local_base_freq"),
        kind=float,
        default=0.0,
        check="nonneg",
    ),
)


def _sliding_layers(variant: Variant, source: ConfigSource, n_layers: int, where: str) -> tuple[int, ...]:
    if source.kind != "gguf" and (types := source.get("layer_types")) is not None:
        if not isinstance(types, list) or len(types) != n_layers or any(t not in LAYER_TYPES for t in types):
            raise ModelLoadError(
                f"{where}: 'layer_types' {types!r} is not {n_layers} of {sorted(LAYER_TYPES)}"
            )
        return tuple(i for i, t in enumerate(types) if LAYER_TYPES[t])
    key = (
        f"{source.architecture}.attention.sliding_window_pattern"
        if source.kind == "gguf"
        else ("sliding_window_pattern")
    )
    pattern = source.get(key)
    if isinstance(pattern, list):  # per layer: true = sliding
        if len(pattern) != n_layers or not all(isinstance(p, bool) for p in pattern):
            raise FormatError(f"{where}: '{key}' must be {n_layers} booleans")
        return tuple(i for i, p in enumerate(pattern) if p)
    n = DEFAULT_PATTERN[variant.name] if pattern is None else pattern
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise FormatError(f"{where}: '{key}' must be a non-negative integer, got {n!r}")
    return tuple(i for i in range(n_layers) if n == 0 or i % n < n - 1)


def finish(
    variant: Variant, source: ConfigSource, values: Mapping[str, Any], present: frozenset[str], where: str
) -> ModelConfig:
    v = dict(values)
    scalar = source.get("query_pre_attn_scalar") if source.kind != "gguf" else None
    if scalar is not None and (
        isinstance(scalar, bool) or not isinstance(scalar, int | float) or scalar <= 0
    ):
        raise FormatError(f"{where}: config key 'query_pre_attn_scalar' must be > 0, got {scalar!r}")
    if variant.name == "gemma3" and not v["rope_local_theta"]:
        v["rope_local_theta"] = v["rope_theta"] if source.kind == "gguf" else 10000.0
    if variant.name == "gemma2":
        v["rope_local_theta"] = 0.0
    offset = {"hf": 1.0, "gguf": 0.0}.get(source.kind)
    if offset is None:  # .apr: as its source stored the weights
        offset = float(source.get("norm_offset") or 0.0)
    window = v["sliding_window"]
    return ModelConfig(
        architecture=variant.name,
        family="gemma",
        vocab_size=sources.vocab_size(source, present, where),
        qk_norm="blk.{i}.attn_q_norm.weight" in present,
        tied_embeddings=sources.tied_embeddings(source, present),
        qk_layout=sources.qk_layout(variant, source, where),
        rope_scaling=sources.rope_scaling(source, False, where),
        sliding_layers=_sliding_layers(variant, source, v["n_layers"], where) if window else (),
        attn_scale=float(scalar) ** -0.5 if scalar else 0.0,
        embed_scale=math.sqrt(v["hidden_size"]),
        norm_offset=offset,
        **v,
    )


def roles(c: ModelConfig) -> tuple[TensorRole, ...]:
    D, Dh = c.hidden_size, c.head_dim
    layer = "model.layers.{i}."
    return (
        *common.global_roles(c),
        TensorRole("blk.{i}.attn_norm.weight", layer + "input_layernorm.weight", lambda _: (D,)),
        *common.attention_roles(c),
        TensorRole(
            "blk.{i}.attn_q_norm.weight", layer + "self_attn.q_norm.weight", lambda _: (Dh,), OPTIONAL
        ),
        TensorRole(
            "blk.{i}.attn_k_norm.weight", layer + "self_attn.k_norm.weight", lambda _: (Dh,), OPTIONAL
        ),
        TensorRole(
            "blk.{i}.post_attention_norm.weight", layer + "post_attention_layernorm.weight", lambda _: (D,)
        ),
        TensorRole("blk.{i}.ffn_norm.weight", layer + "pre_feedforward_layernorm.weight", lambda _: (D,)),
        *common.swiglu_roles(D, c.intermediate_size),
        TensorRole(
            "blk.{i}.post_ffw_norm.weight", layer + "post_feedforward_layernorm.weight", lambda _: (D,)
        ),
    )


def graph(c: ModelConfig) -> tuple[StageNode, ...]:
    ffn = common.swiglu_nodes(Stage.FFN_NORM)
    return (
        StageNode(Stage.EMBEDDING, (), ("token_embd.weight",)),
        StageNode(Stage.ATTN_NORM, (PREV_OUTPUT,), ("blk.{i}.attn_norm.weight",), norm=True),
        *common.attention_nodes(c, Stage.ATTN_NORM),
        StageNode(
            Stage.ATTN_POST_NORM, (Stage.ATTN_OUT,), ("blk.{i}.post_attention_norm.weight",), norm=True
        ),
        StageNode(Stage.POST_ATTN_RESIDUAL, (Stage.ATTN_POST_NORM, PREV_OUTPUT)),
        StageNode(Stage.FFN_NORM, (Stage.POST_ATTN_RESIDUAL,), ("blk.{i}.ffn_norm.weight",), norm=True),
        *ffn,
        StageNode(Stage.FFN_POST_NORM, (Stage.FFN_OUT,), ("blk.{i}.post_ffw_norm.weight",), norm=True),
        StageNode(Stage.POST_FFN_RESIDUAL, (Stage.FFN_POST_NORM, Stage.POST_ATTN_RESIDUAL)),
        *common.head_nodes(),
    )


def block(w: Weights, cfg: ModelConfig, i: int, x: Array, tap: Tap, rot: decoder.Rotary) -> Array:
    """Decoder layer i: (T, D) → (T, D)."""
    p, emit = decoder.layer_names(i), decoder.emitter(tap, i)

    def norm(v: Array, name: str) -> Array:
        return ops.rms_norm(v, decoder.norm_weight(w, cfg, p(name)), cfg.rms_eps)  # (T, D)

    # attention, between its pre- and post-norm
    h = norm(x, "attn_norm.weight")  # (T, D)
    emit(Stage.ATTN_NORM, h)
    o = decoder.attention(w, cfg, i, h, emit, rot)  # (T, D)
    o = norm(o, "post_attention_norm.weight")  # (T, D)
    emit(Stage.ATTN_POST_NORM, o)
    x = x + o  # (T, D)
    emit(Stage.POST_ATTN_RESIDUAL, x)
    # feed-forward (GeGLU), between its pre- and post-norm
    h = norm(x, "ffn_norm.weight")  # (T, D)
    emit(Stage.FFN_NORM, h)
    f = decoder.swiglu(w, i, h, emit, ops.gelu_tanh)  # (T, D)
    f = norm(f, "post_ffw_norm.weight")  # (T, D)
    emit(Stage.FFN_POST_NORM, f)
    x = x + f  # (T, D)
    emit(Stage.POST_FFN_RESIDUAL, x)
    return x


DECODER: Final = decoder.Decoder(block)


LAYER_HOOKS: Final = (
    ("input_layernorm", OUT, Stage.ATTN_NORM),
    ("self_attn.o_proj", IN, Stage.ATTENTION),
    ("self_attn.o_proj", OUT, Stage.ATTN_OUT),
    ("post_attention_layernorm", OUT, Stage.ATTN_POST_NORM),
    ("pre_feedforward_layernorm", IN, Stage.POST_ATTN_RESIDUAL),
    ("pre_feedforward_layernorm", OUT, Stage.FFN_NORM),
    ("mlp.gate_proj", OUT, Stage.FFN_GATE),
    ("mlp.up_proj", OUT, Stage.FFN_UP),
    ("mlp.act_fn", OUT, Stage.FFN_SILU),
    ("mlp.down_proj", IN, Stage.FFN_SWIGL),
    ("mlp.down_proj", OUT, Stage.FFN_OUT),
    ("post_feedforward_layernorm", OUT, Stage.FFN_POST_NORM),
    ("", OUT, Stage.POST_FFN_RESIDUAL),
)
GGML_NODES: Final = {
    **{k: v for k, v in common.LLAMA_NODES.items() if k not in ("embd", "ffn_inp", "ffn_swiglu")},
    "inp_scaled": Stage.EMBEDDING,  # embd × sqrt(D)
    "kq_scaled_2": Stage.ATTN_SCORES,  # Gemma 2: cap · tanh(kq / cap), the SOFT_MAX's input (Q pre-scaled)
    "attn_post_norm": Stage.ATTN_POST_NORM,
    "sa_out": Stage.POST_ATTN_RESIDUAL,
    "ffn_geglu": Stage.FFN_SWIGL,  # the fused GEGLU op: gelu(gate) alone is never materialized
    "ffn_post_norm": Stage.FFN_POST_NORM,  # Gemma 2 names it with il = -1 (bare)
}


def _refuse_act(v: Any) -> str | None:
    return None if v == "gelu_pytorch_tanh" else f"activation {v!r} (Gemma computes gelu_pytorch_tanh)"


def hf_extra(cfg: ModelConfig) -> dict[str, Any]:
    """config.json keys of a Gemma export that no Param writes (transformers 5 spelling)."""
    types = ["sliding_attention" if cfg.layer_window(i) else "full_attention" for i in range(cfg.n_layers)]
    scalar = cfg.attn_scale**-2 if cfg.attn_scale else cfg.head_dim
    out: dict[str, Any] = {
        "query_pre_attn_scalar": scalar,
        "hidden_activation": "gelu_pytorch_tanh",
        "layer_types": types,
        "sliding_window": cfg.sliding_window or None,
    }
    if cfg.architecture == "gemma3":  # RoPE per layer type; the scaling (if any) is the global layers'
        full = {"rope_type": "default", "rope_theta": cfg.rope_theta} | (cfg.rope_scaling.hf_dict() or {})
        local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
        out |= {"rope_parameters": {"full_attention": full, "sliding_attention": local}, "rope_scaling": None}
    return out


FAMILY: Final = Family(
    name="gemma",
    variants=VARIANTS,
    params=PARAMS,
    finish=finish,
    roles=roles,
    graph=graph,
    forward=DECODER.forward,
    layer=DECODER.layer,
    hooks=HookMap(LAYER_HOOKS, common.MODEL_HOOKS, rms_norm_offset=1.0),
    ggml_nodes=GGML_NODES,
    gguf_keys=(*sources.ROPE_GGUF_KEYS, "{arch}.attention.sliding_window_pattern"),
    hf_extra=hf_extra,
    hf_refuse={
        "hidden_activation": _refuse_act,
        "use_bidirectional_attention": lambda v: "bidirectional attention" if v else None,
        "partial_rotary_factor": sources.HF_REFUSE["partial_rotary_factor"],
        "attention_bias": lambda v: "attention biases (attention_bias: true)" if v else None,
    },
)
