"""The transformers class of each MoE variant (apr.models.moe), as a table.

`HF_CLASSES` gives, per variant: the names save_pretrained gives the router and the experts (what an HF
folder is read as and `apr export` writes), the optional attention tensors the class has no parameter for
(no HF name: an HF folder holding one is refused, an export of one refused by name), those it always has
(required here too: Qwen3-MoE's QK-norm), the sets one config flag builds (all present or none: Qwen2-MoE's
qkv_bias, Qwen3-MoE's attention_bias), and the config.json keys an export writes for it that no Param does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from apr.models.config import ModelConfig

QKV_BIAS: Final = frozenset({"blk.{i}.attn_q.bias", "blk.{i}.attn_k.bias", "blk.{i}.attn_v.bias"})
O_BIAS: Final = "blk.{i}.attn_output.bias"
QK_NORM: Final = frozenset({"blk.{i}.attn_q_norm.weight", "blk.{i}.attn_k_norm.weight"})


@dataclass(frozen=True, slots=True)
class HFClass:
    """A variant's transformers class: where it keeps the router and the per-expert matrices (`{e}`: the
    expert), the optional attention roles it lacks or always has, and its export's config.json keys."""

    router: str
    gate: str
    up: str
    down: str
    config: Callable[[ModelConfig], dict[str, Any]]  # config.json keys no Param writes
    router_alt: str = ""  # transformers 5's name when it renamed the block (Mixtral: mlp)
    lacks: frozenset[str] = frozenset()  # no parameter for these: no HF name
    always: frozenset[str] = frozenset()  # built whatever the config says: required
    together: tuple[frozenset[str], ...] = ()  # one config flag builds each set: all present or none


def _mixtral_config(c: ModelConfig) -> dict[str, Any]:
    # MixtralConfig has no expert width of its own: its experts are intermediate_size wide
    return {"intermediate_size": c.expert_ffn, "sliding_window": c.sliding_window or None}


def _qwen_config(c: ModelConfig) -> dict[str, Any]:
    # every layer routed; a window would be Qwen's per-layer one (max_window_layers), which the family's
    # hf_refuse refuses, so the export does too
    return {
        "norm_topk_prob": c.norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "use_sliding_window": c.sliding_window > 0,
    }


_MIXTRAL, QWEN_MLP = "model.layers.{i}.block_sparse_moe.", "model.layers.{i}.mlp."
_QWEN_EXPERTS: Final = (
    QWEN_MLP + "gate.weight",
    QWEN_MLP + "experts.{e}.gate_proj.weight",
    QWEN_MLP + "experts.{e}.up_proj.weight",
    QWEN_MLP + "experts.{e}.down_proj.weight",
)
HF_CLASSES: Final = {
    "mixtral": HFClass(
        _MIXTRAL + "gate.weight",
        _MIXTRAL + "experts.{e}.w1.weight",
        _MIXTRAL + "experts.{e}.w3.weight",
        _MIXTRAL + "experts.{e}.w2.weight",
        _mixtral_config,
        router_alt=QWEN_MLP + "gate.weight",
        lacks=QKV_BIAS | {O_BIAS} | QK_NORM,
    ),
    "qwen2moe": HFClass(
        *_QWEN_EXPERTS,
        lambda c: _qwen_config(c) | {"qkv_bias": c.qkv_bias},  # q/k/v only; attention_bias: unread
        lacks=frozenset({O_BIAS}) | QK_NORM,
        together=(QKV_BIAS,),
    ),
    # attention_bias (q, k, v and o): written from qkv_bias by every export
    "qwen3moe": HFClass(*_QWEN_EXPERTS, _qwen_config, always=QK_NORM, together=(QKV_BIAS | {O_BIAS},)),
}
# transformers 5: (E, 2·F, D), gate rows first
HF_FUSED_GATE_UP: Final = QWEN_MLP + "experts.gate_up_proj"
HF_FUSED_DOWN: Final = QWEN_MLP + "experts.down_proj"  # (E, D, F)
