"""Canonical weight names (GGUF spelling) and the Hugging Face spelling of each, as two tables.

Every Checkpoint exposes canonical names; the safetensors and .apr readers translate with these tables, the
exporters translate back. Names outside the tables pass through unchanged (and the engine will not ask for
them).
"""

from __future__ import annotations

import re
from typing import Final

TOKEN_EMBD: Final = "token_embd.weight"
OUTPUT_NORM: Final = "output_norm.weight"
OUTPUT: Final = "output.weight"

# per-layer canonical suffix -> HF suffix (both relative to the layer prefix)
LAYER_HF: Final[dict[str, str]] = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_HF: Final[dict[str, str]] = {
    TOKEN_EMBD: "model.embed_tokens.weight",
    OUTPUT_NORM: "model.norm.weight",
    OUTPUT: "lm_head.weight",
}
_HF_LAYER_TO_CANON: Final = {v: k for k, v in LAYER_HF.items()}
_HF_GLOBAL_TO_CANON: Final = {v: k for k, v in GLOBAL_HF.items()}
_CANON_LAYER_RE: Final = re.compile(r"^blk\.(\d+)\.(.+)$")
_HF_LAYER_RE: Final = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def blk(layer: int, suffix: str) -> str:
    """`blk(3, "attn_q.weight")` → `"blk.3.attn_q.weight"`."""
    return f"blk.{layer}.{suffix}"


def canonical_from_hf(name: str) -> str:
    if name in _HF_GLOBAL_TO_CANON:
        return _HF_GLOBAL_TO_CANON[name]
    m = _HF_LAYER_RE.match(name)
    if m and m.group(2) in _HF_LAYER_TO_CANON:
        return blk(int(m.group(1)), _HF_LAYER_TO_CANON[m.group(2)])
    return name


def hf_from_canonical(name: str) -> str:
    if name in GLOBAL_HF:
        return GLOBAL_HF[name]
    m = _CANON_LAYER_RE.match(name)
    if m and m.group(2) in LAYER_HF:
        return f"model.layers.{m.group(1)}.{LAYER_HF[m.group(2)]}"
    return name


def canonical_from_any(name: str) -> str:
    """Canonical name of a GGUF- or HF-spelled tensor name (aprender's .apr files hold either)."""
    return canonical_from_hf(name)


def layer_of(name: str) -> int | None:
    m = _CANON_LAYER_RE.match(name)
    return int(m.group(1)) if m else None
