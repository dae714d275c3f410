"""The reference forward pass of the LLaMA / Qwen2 / Qwen3 decoder family, in numpy, with capture points.

Differences between the family members are config flags: `qkv_bias` (Qwen2), `qk_norm` (Qwen3, per-head
RMSNorm of q and k before RoPE), `tied_embeddings`, and `qk_layout`, which picks the RoPE pairing that matches
how the checkpoint stores Q/K rows (adjacent pairs for GGUF-interleaved llama weights, half-split for HF).
The engine calls `tap(StageId, array)` at every stage of spec §6 and knows nothing of files or plans.

Legend: T tokens, D hidden, H query heads, Hkv kv heads, Dh head dim, I ffn width, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from apr.engine import ops
from apr.engine.weights import Weights
from apr.formats import names
from apr.formats.config import ModelConfig, QKLayout
from apr.trace.stages import Stage, StageId, Tap, no_tap

Array = npt.NDArray[Any]
ROPE = {QKLayout.HF: ops.rope_half_split, QKLayout.INTERLEAVED: ops.rope_adjacent}


def block(w: Weights, cfg: ModelConfig, i: int, x: Array, tap: Tap = no_tap) -> Array:
    """Decoder layer i: (T, D) → (T, D)."""
    T, H, Hkv, Dh = x.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def p(suffix: str) -> str:
        return names.blk(i, suffix)

    def emit(stage: Stage, value: Array) -> None:
        tap(StageId(stage, i), value)

    # attention norm
    h = ops.rms_norm(x, w.vector(p("attn_norm.weight")), cfg.rms_eps)  # (T, D)
    emit(Stage.ATTN_NORM, h)
    # q, k, v projections
    q = w.linear(h, p("attn_q.weight"))  # (T, H·Dh)
    k = w.linear(h, p("attn_k.weight"))  # (T, Hkv·Dh)
    v = w.linear(h, p("attn_v.weight"))  # (T, Hkv·Dh)
    emit(Stage.QKV_MATMUL, np.concatenate([q, k, v], axis=1))  # (T, H·Dh + 2·Hkv·Dh)
    if cfg.qkv_bias:
        q = q + w.vector(p("attn_q.bias"))
        k = k + w.vector(p("attn_k.bias"))
        v = v + w.vector(p("attn_v.bias"))
        emit(Stage.QKV_BIAS, np.concatenate([q, k, v], axis=1))  # (T, H·Dh + 2·Hkv·Dh)
    q3 = q.reshape(T, H, Dh)  # (T, H, Dh)
    k3 = k.reshape(T, Hkv, Dh)  # (T, Hkv, Dh)
    v3 = v.reshape(T, Hkv, Dh)  # (T, Hkv, Dh)
    if cfg.qk_norm:
        q3 = ops.rms_norm(q3, w.vector(p("attn_q_norm.weight")), cfg.rms_eps)  # (T, H, Dh)
        k3 = ops.rms_norm(k3, w.vector(p("attn_k_norm.weight")), cfg.rms_eps)  # (T, Hkv, Dh)
    # rotary position embedding
    cos, sin = ops.rope_angles(np.arange(T), Dh, cfg.rope_theta, x.dtype)  # (T, Dh/2) each
    q3 = ROPE[cfg.qk_layout](q3, cos, sin)  # (T, H, Dh)
    k3 = ROPE[cfg.qk_layout](k3, cos, sin)  # (T, Hkv, Dh)
    emit(Stage.Q_POST_ROPE, q3.reshape(T, H * Dh))
    emit(Stage.K_POST_ROPE, k3.reshape(T, Hkv * Dh))
    # causal self-attention (GQA)
    scores = ops.attention_scores(q3, k3, H // Hkv)  # (H, T, T)
    emit(Stage.ATTN_SCORES, ops.upper_zeroed(scores))
    probs = ops.causal_softmax(scores)  # (H, T, T)
    emit(Stage.ATTN_SOFTMAX, probs)
    att = ops.attend(probs, v3, H // Hkv)  # (T, H·Dh)
    emit(Stage.ATTENTION, att)
    o = w.linear(att, p("attn_output.weight"))  # (T, D)
    if w.has(p("attn_output.bias")):
        o = o + w.vector(p("attn_output.bias"))
    emit(Stage.ATTN_OUT, o)
    x = x + o  # (T, D)
    emit(Stage.POST_ATTN_RESIDUAL, x)
    # feed-forward (SwiGLU)
    h = ops.rms_norm(x, w.vector(p("ffn_norm.weight")), cfg.rms_eps)  # (T, D)
    emit(Stage.FFN_NORM, h)
    g = w.linear(h, p("ffn_gate.weight"))  # (T, I)
    emit(Stage.FFN_GATE, g)
    u = w.linear(h, p("ffn_up.weight"))  # (T, I)
    emit(Stage.FFN_UP, u)
    s = ops.silu(g)  # (T, I)
    emit(Stage.FFN_SILU, s)
    su = s * u  # (T, I)
    emit(Stage.FFN_SWIGL, su)
    f = w.linear(su, p("ffn_down.weight"))  # (T, D)
    emit(Stage.FFN_OUT, f)
    x = x + f  # (T, D)
    emit(Stage.POST_FFN_RESIDUAL, x)
    return x


def forward(
    w: Weights,
    cfg: ModelConfig,
    token_ids: npt.ArrayLike,
    tap: Tap = no_tap,
    *,
    lm_head_all: bool = False,
    on_layer: Callable[[int], None] | None = None,
) -> Array:
    """Logits of the last position (V,), or of every position (T, V) with `lm_head_all`."""
    ids = np.asarray(token_ids, dtype=np.int64)  # (T,)
    # token embedding
    x = w.embed(ids)  # (T, D)
    tap(StageId(Stage.EMBEDDING, 0), x)
    # decoder layers
    for i in range(cfg.n_layers):
        x = block(w, cfg, i, x, tap)  # (T, D)
        if on_layer is not None:
            on_layer(i)
    # final norm and lm_head
    x = ops.rms_norm(x, w.vector(names.OUTPUT_NORM), cfg.rms_eps)  # (T, D)
    tap(StageId(Stage.FINAL_NORM), x)
    logits = w.linear(x if lm_head_all else x[-1:], w.lm_head_name())  # (T or 1, V)
    logits = logits if lm_head_all else logits[0]
    tap(StageId(Stage.LM_HEAD), logits)
    return logits
