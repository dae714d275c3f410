"""The stage vocabulary: what a trace can capture, and the order the forward pass produces it in.

The first 23 names, their `all` order and the `layer_output` alias are aprender's (`SaveTensorStage`, spec
§2.1); apr adds the steps some families have and aprender does not name (post-norms, router logits, the
shared expert), after them. `FORWARD_ORDER` is the order a forward pass computes stages in (MoE stages sit
between `ffn_norm` and `post_ffn_residual`); each family's stage graph (apr.models) is a sub-sequence of it.
A `StageId` pairs a stage with its decoder layer (None for the whole-model stages `final_norm` and
`lm_head`) and has one canonical spelling, the GGUF convention: `blk.3.attn_out`, `final_norm`. "First
divergent" always means first in `sort_key` order: layer by layer, forward order, whole-model stages last.

This module sits at the bottom of the package (it imports only errors): formats, engine, families, runtimes
and traces all speak it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, Protocol

import numpy.typing as npt

from apr.errors import StageParseError


class Stage(StrEnum):
    EMBEDDING = "embedding"
    ATTN_NORM = "attn_norm"
    QKV_MATMUL = "qkv_matmul"
    QKV_BIAS = "qkv_bias"
    Q_POST_ROPE = "q_post_rope"
    K_POST_ROPE = "k_post_rope"
    ATTN_SCORES = "attn_scores"
    ATTN_SOFTMAX = "attn_softmax"
    ATTENTION = "attention"
    ATTN_OUT = "attn_out"
    POST_ATTN_RESIDUAL = "post_attn_residual"
    FFN_NORM = "ffn_norm"
    FFN_GATE = "ffn_gate"
    FFN_UP = "ffn_up"
    FFN_SILU = "ffn_silu"
    FFN_SWIGL = "ffn_swigl"
    FFN_OUT = "ffn_out"
    POST_FFN_RESIDUAL = "post_ffn_residual"
    MOE_ROUTER = "moe_router"
    MOE_FFN_OUT = "moe_ffn_out"
    MOE_ROUTER_INDICES = "moe_router_indices"
    FINAL_NORM = "final_norm"
    LM_HEAD = "lm_head"
    # apr's additions (not in aprender's enum)
    ATTN_POST_NORM = "attn_post_norm"
    FFN_POST_NORM = "ffn_post_norm"
    MOE_ROUTER_LOGITS = "moe_router_logits"
    MOE_SHARED_OUT = "moe_shared_out"

    @property
    def per_layer(self) -> bool:
        """Written under `layer-N/`; false only for `final_norm` and `lm_head`."""
        return self not in WHOLE_MODEL_STAGES

    @property
    def moe(self) -> bool:
        return self in MOE_STAGES

    @property
    def order(self) -> int:
        return _ORDER[self]

    @property
    def description(self) -> str:
        return DESCRIPTIONS[self]


STAGE_ORDER: Final[tuple[Stage, ...]] = tuple(Stage)  # `all` and listing order: aprender's, then apr's
FORWARD_ORDER: Final[tuple[Stage, ...]] = (
    Stage.EMBEDDING,
    Stage.ATTN_NORM,
    Stage.QKV_MATMUL,
    Stage.QKV_BIAS,
    Stage.Q_POST_ROPE,
    Stage.K_POST_ROPE,
    Stage.ATTN_SCORES,
    Stage.ATTN_SOFTMAX,
    Stage.ATTENTION,
    Stage.ATTN_OUT,
    Stage.ATTN_POST_NORM,
    Stage.POST_ATTN_RESIDUAL,
    Stage.FFN_NORM,
    Stage.MOE_ROUTER_LOGITS,
    Stage.MOE_ROUTER,
    Stage.MOE_ROUTER_INDICES,
    Stage.FFN_GATE,
    Stage.FFN_UP,
    Stage.FFN_SILU,
    Stage.FFN_SWIGL,
    Stage.FFN_OUT,
    Stage.MOE_SHARED_OUT,
    Stage.MOE_FFN_OUT,
    Stage.FFN_POST_NORM,
    Stage.POST_FFN_RESIDUAL,
    Stage.FINAL_NORM,
    Stage.LM_HEAD,
)
WHOLE_MODEL_STAGES: Final = frozenset({Stage.FINAL_NORM, Stage.LM_HEAD})
MOE_STAGES: Final = frozenset(
    {
        Stage.MOE_ROUTER,
        Stage.MOE_FFN_OUT,
        Stage.MOE_ROUTER_INDICES,
        Stage.MOE_ROUTER_LOGITS,
        Stage.MOE_SHARED_OUT,
    }
)
APRENDER_STAGES: Final[tuple[Stage, ...]] = STAGE_ORDER[: STAGE_ORDER.index(Stage.LM_HEAD) + 1]
DENSE_STAGES: Final[tuple[Stage, ...]] = tuple(s for s in APRENDER_STAGES if s not in MOE_STAGES)
ALIASES: Final[dict[str, Stage]] = {"layer_output": Stage.POST_FFN_RESIDUAL}
_ORDER: Final[dict[Stage, int]] = {s: i for i, s in enumerate(FORWARD_ORDER)}

DESCRIPTIONS: Final[dict[Stage, str]] = {
    Stage.EMBEDDING: "token embedding lookup output",
    Stage.ATTN_NORM: "post-RMSNorm, pre-QKV",
    Stage.QKV_MATMUL: "post QKV matmul, pre-bias; per position [Q|K|V]",
    Stage.QKV_BIAS: "post-bias add, pre-RoPE (models with QKV bias only)",
    Stage.Q_POST_ROPE: "Q after (q_norm and) RoPE",
    Stage.K_POST_ROPE: "K after (k_norm and) RoPE",
    Stage.ATTN_SCORES: "softmax input before the mask: Q·Kᵀ·scale (soft-capped where the family caps), "
    "[heads, S, S], above-diagonal 0",
    Stage.ATTN_SOFTMAX: "softmax(scores + causal mask), [heads, S, S]",
    Stage.ATTENTION: "softmax(QKᵀ)V, heads concatenated, pre O-proj",
    Stage.ATTN_OUT: "post O-projection",
    Stage.POST_ATTN_RESIDUAL: "hidden after the attention residual",
    Stage.FFN_NORM: "post FFN-RMSNorm, pre-gate",
    Stage.FFN_GATE: "post gate matmul",
    Stage.FFN_UP: "post up matmul",
    Stage.FFN_SILU: "act(gate): silu, or gelu-tanh for Gemma",
    Stage.FFN_SWIGL: "act(gate) × up",
    Stage.FFN_OUT: "post down-projection",
    Stage.POST_FFN_RESIDUAL: "hidden after the FFN residual (= layer output)",
    Stage.MOE_ROUTER: "top-k expert weights (MoE models)",
    Stage.MOE_FFN_OUT: "aggregated MoE FFN output (MoE models)",
    Stage.MOE_ROUTER_INDICES: "top-k expert indices as f32 (MoE models)",
    Stage.FINAL_NORM: "post output_norm, all positions",
    Stage.LM_HEAD: "logits (last position unless asked for all; after scaling / soft-capping)",
    Stage.ATTN_POST_NORM: "norm of the O-projection output, pre-residual (Gemma 2/3, OLMo2)",
    Stage.FFN_POST_NORM: "norm of the FFN output, pre-residual (Gemma 2/3, OLMo2)",
    Stage.MOE_ROUTER_LOGITS: "router logits over all experts, [S, experts] (MoE models)",
    Stage.MOE_SHARED_OUT: "shared-expert output after its gate (Qwen2-MoE)",
}


def parse_stage(token: str) -> Stage:
    """One stage name: trimmed, case-insensitive, alias-aware.

    >>> parse_stage(" Layer_Output ")
    <Stage.POST_FFN_RESIDUAL: 'post_ffn_residual'>
    """
    name = token.strip().lower()
    if not name:
        raise StageParseError("save-tensor stage cannot be an empty string")
    if name in ALIASES:
        return ALIASES[name]
    try:
        return Stage(name)
    except ValueError:
        valid = ",".join(STAGE_ORDER)
        raise StageParseError(f'unknown save-tensor stage "{name}"; valid stages: {valid}') from None


_STAGE_ID_RE: Final = re.compile(r"^(?:blk\.|layer-)(\d+)[./](\w+)$")


@dataclass(frozen=True, slots=True, order=False)
class StageId:
    """A stage at a layer. `layer` is None exactly for whole-model stages."""

    stage: Stage
    layer: int | None = None

    def __post_init__(self) -> None:
        if self.stage.per_layer and (self.layer is None or self.layer < 0):
            raise StageParseError(f"stage {self.stage} needs a layer index >= 0")
        if not self.stage.per_layer and self.layer is not None:
            raise StageParseError(f"stage {self.stage} is whole-model and takes no layer")

    def __str__(self) -> str:
        return self.stage.value if self.layer is None else f"blk.{self.layer}.{self.stage.value}"

    @property
    def sort_key(self) -> tuple[int, int]:
        """Forward-pass order: layer, then stage; whole-model stages after every layer."""
        layer = self.layer if self.layer is not None else 1 << 32
        return (layer, self.stage.order)

    @classmethod
    def parse(cls, text: str) -> StageId:
        """`blk.3.attn_out`, `layer-3/attn_out`, `final_norm`, `blk.3.layer_output`."""
        m = _STAGE_ID_RE.match(text.strip())
        if m:
            return cls(parse_stage(m.group(2)), int(m.group(1)))
        return cls(parse_stage(text))


class Tap(Protocol):
    """A capture point consumer: the engine calls `tap(stage_id, array)` at every stage it computes."""

    def __call__(self, sid: StageId, value: npt.NDArray[Any], /) -> None: ...


def tap_wants(tap: Tap, sid: StageId) -> bool:
    """Whether `tap` keeps `sid`, so an engine can skip work done only for a tap (a copy, a concatenation,
    a T×T matrix). A tap says so with a `wants(sid) -> bool` method; a plain callable wants everything."""
    wants = getattr(tap, "wants", None)
    return True if wants is None else bool(wants(sid))


def tap_positions(tap: Tap, n_tokens: int) -> npt.NDArray[Any] | None:
    """The sorted query positions a tap keeps of per-position stages (`positions(n_tokens)` on the tap;
    None: all of them). The engine computes only those rows of the T×T attention stages."""
    positions = getattr(tap, "positions", None)
    return None if positions is None else positions(n_tokens)


def no_tap(sid: StageId, value: npt.NDArray[Any], /) -> None:
    """The default Tap: keep nothing."""
