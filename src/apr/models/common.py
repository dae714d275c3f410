"""What the decoder families share: config readers (vocab size, Q/K layout, RoPE scaling), tensor roles,
stage-graph pieces, the attention and gated-FFN sublayers, and the default runtime maps.

A family module composes these; a step whose math differs stays in the family module. Legend: T tokens,
D hidden, H query heads, Hkv kv heads, Dh head dim, I ffn width, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from apr.engine import ops, rope
from apr.engine.weights import Weights
from apr.errors import FormatError, ModelLoadError
from apr.formats.base import ConfigSource
from apr.formats.config import QKLayout
from apr.models.base import OPTIONAL, PREV_OUTPUT, ROPE_NORM, StageNode, TensorRole, Variant
from apr.models.config import ROPE_KINDS, ModelConfig, RopeScaling
from apr.models.params import typed
from apr.stages import Stage, StageId, Tap

Array = npt.NDArray[Any]
ROPE_FN: Final = {QKLayout.HF: ops.rope_half_split, QKLayout.INTERLEAVED: ops.rope_adjacent}
IN: Final = "in"
OUT: Final = "out"
ITEM: Final = "item:"  # + k: item k of a module's tuple output of flat (batch·S, …) tensors (a MoE router's)

# ---- config readers -------------------------------------------------------------------------------

ROPE_GGUF_KEYS: Final = (
    "{arch}.rope.scaling.type",
    "{arch}.rope.scaling.factor",
    "{arch}.rope.scaling.original_context_length",
    "{arch}.rope.scaling.yarn_beta_fast",
    "{arch}.rope.scaling.yarn_beta_slow",
    "{arch}.rope.scaling.yarn_attn_factor",
    "{arch}.rope.scaling.yarn_ext_factor",
    "{arch}.rope.scaling.finetuned",
)
HF_ROPE_KEYS: Final = ("rope_scaling", "rope_parameters")
# rope_parameters / rope_scaling entries that change the math and that apr does not implement
ROPE_UNSUPPORTED_KEYS: Final = ("mscale", "mscale_all_dim", "partial_rotary_factor", "truncate")
ROPE_KNOWN_KEYS: Final = frozenset(
    {
        "rope_type",
        "type",
        "rope_theta",
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "attention_factor",
        *ROPE_UNSUPPORTED_KEYS,
    }
)


def vocab_size(source: ConfigSource, present: frozenset[str], where: str) -> int:
    """The vocab size as stored, else the tokenizer's, else the embedding's rows (filled in later)."""
    keys = {"gguf": (f"{source.architecture}.vocab_size",), "hf": ("vocab_size",), "apr": ("vocab_size",)}
    for key in keys[source.kind]:
        v = source.get(key)
        if v is not None:
            n = typed(v, int)
            if n is None or n <= 0:
                raise FormatError(f"{where}: config key '{key}' must be a positive integer, got {v!r}")
            return int(n)
    tokens = source.get("tokenizer.ggml.tokens") if source.kind == "gguf" else None
    return len(tokens) if isinstance(tokens, list) else 0  # 0: the embedding decides (models/model.py)


def tied_embeddings(source: ConfigSource, present: frozenset[str]) -> bool:
    """No output.weight; or an .apr import that copied the embedding as lm_head (and says so)."""
    return "output.weight" not in present or (source.kind == "apr" and source.get("tied_embeddings") is True)


def qk_layout(variant: Variant, source: ConfigSource, where: str) -> QKLayout:
    """GGUF: the arch's rope type; HF: HF rows; .apr: its rope_type (aprender's), else the variant's."""
    stored = {ROPE_NORM: QKLayout.INTERLEAVED}.get(variant.rope, QKLayout.HF)
    if source.kind == "hf":
        return QKLayout.HF
    if source.kind == "apr" and (rt := source.get("rope_type")) is not None:
        layouts = {0: QKLayout.INTERLEAVED, 2: QKLayout.HF}
        if rt not in layouts or isinstance(rt, bool):
            raise FormatError(f"{where}: metadata 'rope_type' is {rt!r}: expected 0 or 2")
        return layouts[rt]
    return stored


def rope_scaling(source: ConfigSource, freq_factors: bool, where: str) -> RopeScaling:
    """RoPE scaling from HF `rope_scaling`/`rope_parameters` (also stored so in .apr) or GGUF keys."""
    if freq_factors:
        return RopeScaling("llama3", freq_factors=True)
    if source.kind == "gguf":
        return _gguf_rope(source, where)
    params = next((v for k in HF_ROPE_KEYS if isinstance(v := source.get(k), dict)), None)
    if params is None:
        return RopeScaling()
    if "full_attention" in params or "sliding_attention" in params:  # per layer type (Gemma 3)
        local = params.get("sliding_attention") or {}
        if not isinstance(local, dict) or (local.get("rope_type") or "default") != "default":
            raise ModelLoadError(f"{where}: rope scaling of sliding-window layers is not implemented")
        rest = {k: v for k, v in params.items() if k != "sliding_attention"}
        params = rest.get("full_attention", rest)  # the global layers' (an .apr keeps only the local theta)
        if not isinstance(params, dict):
            raise FormatError(f"{where}: rope_parameters 'full_attention' must be an object")
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind not in ROPE_KINDS:
        raise ModelLoadError(f"{where}: rope scaling type {kind!r} is not implemented")
    unknown = sorted(set(params) - ROPE_KNOWN_KEYS)
    if unknown:
        raise ModelLoadError(f"{where}: rope parameter '{unknown[0]}' is not implemented")
    bad = [k for k in ROPE_UNSUPPORTED_KEYS if params.get(k) not in (None, 1, 1.0, True)]
    if bad:
        raise ModelLoadError(f"{where}: rope scaling '{bad[0]}' = {params[bad[0]]!r} is not implemented")
    if kind == "default":
        return RopeScaling()

    def num(key: str, default: float | None = None) -> float:
        v = params.get(key)
        if v is None and default is not None:
            return default
        x = typed(v, float)
        if x is None or not x > 0:
            raise FormatError(f"{where}: rope scaling '{key}' must be a positive number, got {v!r}")
        return float(x)

    orig = params.get("original_max_position_embeddings")
    return (
        RopeScaling(
            kind,
            factor=num("factor"),
            low_freq_factor=num("low_freq_factor", 1.0),
            high_freq_factor=num("high_freq_factor", 4.0),
            original_max_position=int(num("original_max_position_embeddings")) if kind != "linear" else 0,
            beta_fast=num("beta_fast", 32.0),
            beta_slow=num("beta_slow", 1.0),
            attention_factor=float(params.get("attention_factor") or 0.0),
        )
        if orig is not None or kind == "linear"
        else _missing_orig(kind, where)
    )


def _missing_orig(kind: str, where: str) -> RopeScaling:
    raise FormatError(f"{where}: rope scaling {kind!r} needs 'original_max_position_embeddings'")


def _gguf_rope(source: ConfigSource, where: str) -> RopeScaling:
    arch = source.architecture

    def get(key: str, default: float) -> float:
        v = source.get(f"{arch}.rope.scaling.{key}")
        return default if v is None else float(v)

    kind = source.get(f"{arch}.rope.scaling.type") or "none"
    if kind == "none":
        return RopeScaling()
    if kind not in ("linear", "yarn"):
        raise ModelLoadError(f"{where}: '{arch}.rope.scaling.type' {kind!r} is not implemented")
    if kind == "yarn" and get("yarn_ext_factor", 1.0) != 1.0:
        raise ModelLoadError(f"{where}: yarn_ext_factor {get('yarn_ext_factor', 1.0)} is not implemented")
    return RopeScaling(
        kind,
        factor=get("factor", 1.0),
        original_max_position=int(get("original_context_length", 0)),
        beta_fast=get("yarn_beta_fast", 32.0),
        beta_slow=get("yarn_beta_slow", 1.0),
        attention_factor=get("yarn_attn_factor", 0.0),
    )


HF_REFUSE: Final[dict[str, Callable[[Any], str | None]]] = {
    "partial_rotary_factor": lambda v: None if v in (1, 1.0) else f"partial rotary embeddings ({v})",
    "attn_logit_softcapping": lambda v: f"attention soft-capping ({v})",
    "final_logit_softcapping": lambda v: f"final logit soft-capping ({v})",
    "tie_word_embeddings": lambda v: None,  # follows from whether lm_head.weight is stored
}

# ---- tensor roles -------------------------------------------------------------------------------


def global_roles(c: ModelConfig) -> tuple[TensorRole, ...]:
    V, D = c.vocab_size, c.hidden_size
    return (
        TensorRole("token_embd.weight", "model.embed_tokens.weight", lambda _: (V, D)),
        TensorRole("output_norm.weight", "model.norm.weight", lambda _: (D,)),
        TensorRole("output.weight", "lm_head.weight", lambda _: (V, D), OPTIONAL),
    )


def attention_roles(c: ModelConfig) -> tuple[TensorRole, ...]:
    D, q, kv = c.hidden_size, c.q_dim, c.kv_dim
    return (
        TensorRole("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight", lambda _: (q, D)),
        TensorRole("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight", lambda _: (kv, D)),
        TensorRole("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight", lambda _: (kv, D)),
        TensorRole(
            "blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight", lambda _: (D, q)
        ),
        TensorRole(
            "blk.{i}.attn_output.bias", "model.layers.{i}.self_attn.o_proj.bias", lambda _: (D,), OPTIONAL
        ),
    )


def swiglu_roles(D: int, ffn: int) -> tuple[TensorRole, ...]:
    return (
        TensorRole("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight", lambda _: (ffn, D)),
        TensorRole("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight", lambda _: (ffn, D)),
        TensorRole("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight", lambda _: (D, ffn)),
    )


# ---- stage graph ----------------------------------------------------------------------------------


def attention_nodes(c: ModelConfig, norm_stage: Stage | str) -> tuple[StageNode, ...]:
    qk_in = (Stage.QKV_BIAS,) if c.qkv_bias else (Stage.QKV_MATMUL,)
    qkv_w = ("blk.{i}.attn_q.weight", "blk.{i}.attn_k.weight", "blk.{i}.attn_v.weight")
    bias = (
        (
            StageNode(
                Stage.QKV_BIAS,
                (Stage.QKV_MATMUL,),
                ("blk.{i}.attn_q.bias", "blk.{i}.attn_k.bias", "blk.{i}.attn_v.bias"),
                ("seq", "q|k|v"),
            ),
        )
        if c.qkv_bias
        else ()
    )
    return (
        StageNode(Stage.QKV_MATMUL, (norm_stage,), qkv_w, ("seq", "q|k|v"), matmul=True),
        *bias,
        StageNode(
            Stage.Q_POST_ROPE,
            qk_in,
            ("blk.{i}.attn_q_norm.weight",),
            ("seq", "head*head_dim"),
            norm=c.qk_norm,
        ),
        StageNode(
            Stage.K_POST_ROPE,
            qk_in,
            ("blk.{i}.attn_k_norm.weight",),
            ("seq", "kv_head*head_dim"),
            norm=c.qk_norm,
        ),
        StageNode(Stage.ATTN_SCORES, (Stage.Q_POST_ROPE, Stage.K_POST_ROPE), (), ("head", "query", "key")),
        StageNode(Stage.ATTN_SOFTMAX, (Stage.ATTN_SCORES,), (), ("head", "query", "key")),
        StageNode(Stage.ATTENTION, (Stage.ATTN_SOFTMAX, *qk_in), (), ("seq", "head*head_dim")),
        StageNode(
            Stage.ATTN_OUT,
            (Stage.ATTENTION,),
            ("blk.{i}.attn_output.weight", "blk.{i}.attn_output.bias"),
            matmul=True,
        ),
    )


def swiglu_nodes(norm_stage: Stage) -> tuple[StageNode, ...]:
    ffn = ("seq", "ffn")
    return (
        StageNode(Stage.FFN_GATE, (norm_stage,), ("blk.{i}.ffn_gate.weight",), ffn, matmul=True),
        StageNode(Stage.FFN_UP, (norm_stage,), ("blk.{i}.ffn_up.weight",), ffn, matmul=True),
        StageNode(Stage.FFN_SILU, (Stage.FFN_GATE,), (), ffn),
        StageNode(Stage.FFN_SWIGL, (Stage.FFN_SILU, Stage.FFN_GATE, Stage.FFN_UP), (), ffn),
        StageNode(Stage.FFN_OUT, (Stage.FFN_SWIGL,), ("blk.{i}.ffn_down.weight",), matmul=True),
    )


def moe_nodes(norm_stage: Stage, shared: bool = True) -> tuple[StageNode, ...]:
    """aprender's MoE stages (and apr's router logits / shared expert), between ffn_norm and the residual.
    Router logits → top-k weights and expert ids; the routed experts' weighted sum (+ the shared expert)."""
    shexp = (
        (
            StageNode(
                Stage.MOE_SHARED_OUT,
                (norm_stage,),
                (
                    "blk.{i}.ffn_gate_shexp.weight",
                    "blk.{i}.ffn_up_shexp.weight",
                    "blk.{i}.ffn_down_shexp.weight",
                    "blk.{i}.ffn_gate_inp_shexp.weight",
                ),
                matmul=True,
            ),
        )
        if shared
        else ()
    )
    return (
        StageNode(
            Stage.MOE_ROUTER_LOGITS,
            (norm_stage,),
            ("blk.{i}.ffn_gate_inp.weight",),
            ("seq", "expert"),
            matmul=True,
        ),
        StageNode(Stage.MOE_ROUTER, (Stage.MOE_ROUTER_LOGITS,), (), ("seq", "k")),
        StageNode(Stage.MOE_ROUTER_INDICES, (Stage.MOE_ROUTER_LOGITS,), (), ("seq", "k")),
        *shexp,
        StageNode(
            Stage.MOE_FFN_OUT,
            (Stage.MOE_ROUTER, Stage.MOE_ROUTER_INDICES, norm_stage, *(n.stage for n in shexp)),
            (
                "blk.{i}.ffn_gate_exps.weight",
                "blk.{i}.ffn_up_exps.weight",
                "blk.{i}.ffn_gate_up_exps.weight",
                "blk.{i}.ffn_down_exps.weight",
            ),
            matmul=True,
        ),
    )


def head_nodes() -> tuple[StageNode, ...]:
    return (
        StageNode(Stage.FINAL_NORM, (PREV_OUTPUT,), ("output_norm.weight",), norm=True),
        StageNode(
            Stage.LM_HEAD,
            (Stage.FINAL_NORM,),
            ("output.weight", "token_embd.weight"),
            ("seq", "vocab"),
            matmul=True,
        ),
    )


# ---- forward pieces -------------------------------------------------------------------------------


def layer_names(i: int) -> Callable[[str], str]:
    return lambda suffix: f"blk.{i}.{suffix}"


def emitter(tap: Tap, i: int) -> Callable[[Stage, Array], None]:
    return lambda stage, value: tap(StageId(stage, i), value)


def norm_weight(w: Weights, cfg: ModelConfig, name: str) -> Array:
    """A norm's weight as the forward multiplies by it: w + norm_offset (Gemma's HF (1 + w))."""
    v = w.vector(name)
    return v + v.dtype.type(cfg.norm_offset) if cfg.norm_offset else v


@dataclass(frozen=True, slots=True)
class Rotary:
    """cos/sin tables for every position, once per forward: (T, Dh/2) each, global and local layers."""

    cos: Array
    sin: Array
    local: tuple[Array, Array] | None = None  # Gemma 3's sliding-window layers use their own base

    @classmethod
    def build(cls, w: Weights, cfg: ModelConfig, t: int) -> Rotary:
        pos = np.arange(t)
        factors = w.vector("rope_freqs.weight") if cfg.rope_scaling.freq_factors else None
        freqs, mult = rope.inv_freq(cfg.rope_scaling, cfg.head_dim, cfg.rope_theta, factors)
        cos, sin = rope.angles(pos, freqs, mult, w.dtype)
        local = None
        if cfg.rope_local_theta:
            lf, lm = rope.inv_freq(type(cfg.rope_scaling)(), cfg.head_dim, cfg.rope_local_theta)
            local = rope.angles(pos, lf, lm, w.dtype)
        return cls(cos, sin, local)

    def for_layer(self, cfg: ModelConfig, i: int) -> tuple[Array, Array]:
        if self.local is not None and cfg.layer_window(i):
            return self.local
        return self.cos, self.sin


def attention(
    w: Weights,
    cfg: ModelConfig,
    i: int,
    h: Array,
    emit: Callable[[Stage, Array], None],
    rot: Rotary,
    *,
    qk_norm_full: bool = False,
) -> Array:
    """Self-attention of layer i on its normed input h: (T, D) → O-projection output (T, D).

    QK-norm is per head (Qwen3, Gemma 3) or over the whole projection (`qk_norm_full`, OLMo2)."""
    p = layer_names(i)
    T, H, Hkv, Dh = h.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    # q, k, v projections (+ bias)
    q = w.linear(h, p("attn_q.weight"))  # (T, H·Dh)
    k = w.linear(h, p("attn_k.weight"))  # (T, Hkv·Dh)
    v = w.linear(h, p("attn_v.weight"))  # (T, Hkv·Dh)
    emit(Stage.QKV_MATMUL, np.concatenate([q, k, v], axis=1))  # (T, H·Dh + 2·Hkv·Dh)
    if cfg.qkv_bias:
        q = q + w.vector(p("attn_q.bias"))
        k = k + w.vector(p("attn_k.bias"))
        v = v + w.vector(p("attn_v.bias"))
        emit(Stage.QKV_BIAS, np.concatenate([q, k, v], axis=1))  # (T, H·Dh + 2·Hkv·Dh)
    if cfg.qk_norm and qk_norm_full:
        q = ops.rms_norm(q, norm_weight(w, cfg, p("attn_q_norm.weight")), cfg.rms_eps)  # (T, H·Dh)
        k = ops.rms_norm(k, norm_weight(w, cfg, p("attn_k_norm.weight")), cfg.rms_eps)  # (T, Hkv·Dh)
    q3 = q.reshape(T, H, Dh)  # (T, H, Dh)
    k3 = k.reshape(T, Hkv, Dh)  # (T, Hkv, Dh)
    v3 = v.reshape(T, Hkv, Dh)  # (T, Hkv, Dh)
    if cfg.qk_norm and not qk_norm_full:
        q3 = ops.rms_norm(q3, norm_weight(w, cfg, p("attn_q_norm.weight")), cfg.rms_eps)  # (T, H, Dh)
        k3 = ops.rms_norm(k3, norm_weight(w, cfg, p("attn_k_norm.weight")), cfg.rms_eps)  # (T, Hkv, Dh)
    # rotary position embedding
    cos, sin = rot.for_layer(cfg, i)  # (T, Dh/2) each
    q3 = ROPE_FN[cfg.qk_layout](q3, cos, sin)  # (T, H, Dh)
    k3 = ROPE_FN[cfg.qk_layout](k3, cos, sin)  # (T, Hkv, Dh)
    emit(Stage.Q_POST_ROPE, q3.reshape(T, H * Dh))
    emit(Stage.K_POST_ROPE, k3.reshape(T, Hkv * Dh))
    # causal self-attention (GQA; sliding window and soft-capping where the config says)
    window = cfg.layer_window(i)
    scores = ops.attention_scores(q3, k3, H // Hkv, cfg.attn_scale)  # (H, T, T)
    if cfg.attn_softcap:
        scores = ops.softcap(scores, cfg.attn_softcap)  # (H, T, T)
    emit(Stage.ATTN_SCORES, ops.upper_zeroed(scores, window))
    probs = ops.causal_softmax(scores, window)  # (H, T, T)
    emit(Stage.ATTN_SOFTMAX, probs)
    att = ops.attend(probs, v3, H // Hkv)  # (T, H·Dh)
    emit(Stage.ATTENTION, att)
    o = w.linear(att, p("attn_output.weight"))  # (T, D)
    if w.has(p("attn_output.bias")):
        o = o + w.vector(p("attn_output.bias"))
    emit(Stage.ATTN_OUT, o)
    return o


def swiglu(
    w: Weights, i: int, h: Array, emit: Callable[[Stage, Array], None], act: Callable[[Array], Array]
) -> Array:
    """Gated FFN of layer i: down(act(gate(h)) ⊙ up(h)). (T, D) → (T, D)."""
    p = layer_names(i)
    g = w.linear(h, p("ffn_gate.weight"))  # (T, I)
    emit(Stage.FFN_GATE, g)
    u = w.linear(h, p("ffn_up.weight"))  # (T, I)
    emit(Stage.FFN_UP, u)
    s = act(g)  # (T, I)
    emit(Stage.FFN_SILU, s)
    su = s * u  # (T, I)
    emit(Stage.FFN_SWIGL, su)
    f = w.linear(su, p("ffn_down.weight"))  # (T, D)
    emit(Stage.FFN_OUT, f)
    return f


def lm_head(w: Weights, cfg: ModelConfig, x: Array, tap: Tap, all_positions: bool) -> Array:
    """Logits from the final-normed hidden state: ÷ logit_divisor, then the final soft-cap."""
    logits = w.linear(x if all_positions else x[-1:], w.lm_head_name())  # (T or 1, V)
    if cfg.logit_divisor != 1.0:
        logits = logits / logits.dtype.type(cfg.logit_divisor)
    if cfg.final_softcap:
        logits = ops.softcap(logits, cfg.final_softcap)
    logits = logits if all_positions else logits[0]
    tap(StageId(Stage.LM_HEAD), logits)
    return logits


# ---- runtime maps ----------------------------------------------------------------------------------

LLAMA_LAYER_HOOKS: Final[tuple[tuple[str, str, Stage], ...]] = (
    ("input_layernorm", OUT, Stage.ATTN_NORM),
    ("self_attn.o_proj", IN, Stage.ATTENTION),
    ("self_attn.o_proj", OUT, Stage.ATTN_OUT),
    ("post_attention_layernorm", IN, Stage.POST_ATTN_RESIDUAL),
    ("post_attention_layernorm", OUT, Stage.FFN_NORM),
    ("mlp.gate_proj", OUT, Stage.FFN_GATE),
    ("mlp.up_proj", OUT, Stage.FFN_UP),
    ("mlp.act_fn", OUT, Stage.FFN_SILU),
    ("mlp.down_proj", IN, Stage.FFN_SWIGL),
    ("mlp.down_proj", OUT, Stage.FFN_OUT),
    ("", OUT, Stage.POST_FFN_RESIDUAL),
)
# the embedding as the first layer sees it (after Gemma's / Granite's scaling), the final norm, the logits
# as the model returns them (after Granite's division and Gemma 2's soft-cap: `logits` is the output)
MODEL_HOOKS: Final[tuple[tuple[str, str, Stage], ...]] = (
    ("model.layers.0", IN, Stage.EMBEDDING),
    ("model.norm", OUT, Stage.FINAL_NORM),
    ("", OUT, Stage.LM_HEAD),
)
# llama.cpp's cb_eval names (llm_graph_context::cb, without the "-{il}" suffix) → stage: the llama builders
# and build_attn / build_ffn in llama-graph.cpp. runtimes/llamacpp.py finds by structure what no name
# says (attn_out, an unnamed residual add) and takes Qcur/Kcur/Vcur apart by op.
LLAMA_NODES: Final[Mapping[str, Stage]] = {
    "embd": Stage.EMBEDDING,  # build_inp_embd, after Granite's embedding_scale
    "attn_norm": Stage.ATTN_NORM,
    "kq": Stage.ATTN_SCORES,  # the SOFT_MAX's input; × its scale
    "kq_soft_max": Stage.ATTN_SOFTMAX,
    "kqv_out": Stage.ATTENTION,
    "ffn_inp": Stage.POST_ATTN_RESIDUAL,
    "ffn_norm": Stage.FFN_NORM,
    "ffn_gate": Stage.FFN_GATE,
    "ffn_up": Stage.FFN_UP,
    "ffn_swiglu": Stage.FFN_SWIGL,  # the fused SWIGLU op: silu(gate) alone is never materialized
    "ffn_out": Stage.FFN_OUT,
    "l_out": Stage.POST_FFN_RESIDUAL,
    "result_norm": Stage.FINAL_NORM,
    "result_output": Stage.LM_HEAD,  # after Granite's logit_scale
}
