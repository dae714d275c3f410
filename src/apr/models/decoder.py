"""The forward pieces the families share: per-layer names and taps, RoPE tables, the attention and gated-FFN
sublayers, the lm_head, and `Decoder`, the layer loop around a family's `block`.

A family writes its own `block` (the math of one decoder layer, straight-line, with its taps); everything
around it — embedding, RoPE tables, the layer loop, final norm, logits — is the same for every family and is
written once here. Legend: T tokens, D hidden, H query heads, Hkv kv heads, Dh head dim, I ffn width, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from apr.engine import ggml_math, ops, rope
from apr.engine.weights import Weights
from apr.formats.config import QKLayout
from apr.models.config import ModelConfig
from apr.stages import Stage, StageId, Tap, tap_positions, tap_wants

Array = npt.NDArray[Any]
ROPE_FN: Final = {QKLayout.HF: ops.rope_half_split, QKLayout.INTERLEAVED: ops.rope_adjacent}
GGML_ROPE_KINDS: Final = ("default", "linear")  # the scalings whose tables --precision ggml builds as ggml


def layer_names(i: int) -> Callable[[str], str]:
    return lambda suffix: f"blk.{i}.{suffix}"


@dataclass(frozen=True, slots=True)
class Emit:
    """Layer i's capture points: `emit(stage, value)` taps it; `wants(stage)` says whether the tap keeps
    it, so work done only for the tap (a concatenation, a zeroed copy) is skipped when it does not."""

    tap: Tap
    layer: int

    def __call__(self, stage: Stage, value: Array) -> None:
        self.tap(StageId(stage, self.layer), value)

    def wants(self, stage: Stage) -> bool:
        return tap_wants(self.tap, StageId(stage, self.layer))


def emitter(tap: Tap, i: int) -> Emit:
    return Emit(tap, i)


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
        kind = cfg.rope_scaling.kind
        if w.ggml and (factors is not None or kind in GGML_ROPE_KINDS):  # ggml's own rope cache, bit for bit
            scale = 1.0 / cfg.rope_scaling.factor if kind == "linear" and factors is None else 1.0
            cos, sin = ggml_math.rope_tables(pos, cfg.head_dim, cfg.rope_theta, scale, factors)
            local = None
            if cfg.rope_local_theta:
                local = ggml_math.rope_tables(pos, cfg.head_dim, cfg.rope_local_theta)
            return cls(cos, sin, local)
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
    emit: Emit,
    rot: Rotary,
    *,
    qk_norm_full: bool = False,
) -> Array:
    """Self-attention of layer i on its normed input h: (T, D) → O-projection output (T, D).

    QK-norm is per head (Qwen3, Gemma 3) or over the whole projection (`qk_norm_full`, OLMo2)."""
    p = layer_names(i)
    T, H, Hkv, Dh = h.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    # q (T, H·Dh), k and v (T, Hkv·Dh): one batch of row blocks on the threads (+ bias)
    q, k, v = w.linears(h, [p("attn_q.weight"), p("attn_k.weight"), p("attn_v.weight")])
    if emit.wants(Stage.QKV_MATMUL):
        emit(Stage.QKV_MATMUL, np.concatenate([q, k, v], axis=1))  # (T, H·Dh + 2·Hkv·Dh)
    if cfg.qkv_bias:
        q = q + w.vector(p("attn_q.bias"))
        k = k + w.vector(p("attn_k.bias"))
        v = v + w.vector(p("attn_v.bias"))
        if emit.wants(Stage.QKV_BIAS):
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
    fused = w.ggml and cos.dtype == np.float32  # ggml's compiled rotation (fused multiply-adds)
    q3 = ROPE_FN[cfg.qk_layout](q3, cos, sin, fused)  # (T, H, Dh)
    k3 = ROPE_FN[cfg.qk_layout](k3, cos, sin, fused)  # (T, Hkv, Dh)
    emit(Stage.Q_POST_ROPE, q3.reshape(T, H * Dh))
    emit(Stage.K_POST_ROPE, k3.reshape(T, Hkv * Dh))
    if w.kv_f16:  # llama.cpp's f16 KV cache: K and V stored as f16 and read back
        k3, v3 = ops.f16_round(k3), ops.f16_round(v3)
        if w.ggml:  # ggml-cpu converts the f32 operand of an f16 matmul to f16 (Q here, the probs for ·V)
            q3 = ops.f16_round(q3)
    # causal self-attention (GQA; sliding window and soft-capping where the config says), a block of
    # queries at a time; the (H, R, T) scores and probabilities only of the positions the tap keeps
    rows = None
    if emit.wants(Stage.ATTN_SCORES) or emit.wants(Stage.ATTN_SOFTMAX):
        kept = tap_positions(emit.tap, T)
        rows = np.arange(T) if kept is None else kept
    a = ops.causal_attention(
        q3,
        k3,
        v3,
        scale=cfg.attn_scale,
        cap=cfg.attn_softcap,
        window=cfg.layer_window(i),
        keep_rows=rows,
        each=w.each,
        ggml_kv=("f16" if w.kv_f16 else "f32") if w.ggml and q3.dtype == np.float32 else None,
    )
    if a.scores is not None and a.probs is not None:
        for stage, kept in ((Stage.ATTN_SCORES, a.scores), (Stage.ATTN_SOFTMAX, a.probs)):
            if emit.wants(stage):
                emit(stage, kept)  # (H, R, T); scores: hidden entries 0.0
    att = a.out  # (T, H·Dh)
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
    g, u = w.linears(h, [p("ffn_gate.weight"), p("ffn_up.weight")])  # (T, I) each, one batch of row blocks
    emit(Stage.FFN_GATE, g)
    emit(Stage.FFN_UP, u)
    s = w.elementwise(act, g)  # (T, I)
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


BlockFn = Callable[[Weights, ModelConfig, int, Array, Tap, Rotary], Array]


@dataclass(frozen=True, slots=True)
class Decoder:
    """embed · embed_scale → block per layer → final norm → lm_head, around a family's `block`."""

    block: BlockFn

    def forward(
        self,
        w: Weights,
        cfg: ModelConfig,
        token_ids: npt.ArrayLike,
        tap: Tap,
        *,
        lm_head_all: bool = False,
        on_layer: Callable[[int], None] | None = None,
    ) -> Array:
        """Logits of the last position (V,), or of every position (T, V) with `lm_head_all`."""
        ids = np.asarray(token_ids, dtype=np.int64)  # (T,)
        # token embedding (× Gemma's sqrt(D), Granite's multiplier)
        x = w.embed(ids) * w.dtype.type(cfg.embed_scale)  # (T, D)
        tap(StageId(Stage.EMBEDDING, 0), x)
        rot = Rotary.build(w, cfg, len(ids))
        # decoder layers
        for i in range(cfg.n_layers):
            x = self.block(w, cfg, i, x, tap, rot)  # (T, D)
            if on_layer is not None:
                on_layer(i)
        # final norm and lm_head
        x = ops.rms_norm(x, norm_weight(w, cfg, "output_norm.weight"), cfg.rms_eps)  # (T, D)
        tap(StageId(Stage.FINAL_NORM), x)
        return lm_head(w, cfg, x, tap, lm_head_all)

    def layer(self, w: Weights, cfg: ModelConfig, i: int, x: Array, tap: Tap) -> Array:
        """Layer i alone on the given input (T, D) → (T, D) (bisect --isolate)."""
        return self.block(w, cfg, i, x, tap, Rotary.build(w, cfg, x.shape[0]))
