"""Error growth: tell a stage that *makes* error from one that only carries the error of its inputs.

Each stage's error e is the relative L2 error ‖a−b‖/‖b‖ against side A (the reference). Its inputs are the
stages it is computed from (`STAGE_INPUTS`, the data flow of the decoder), and its input error e_in is the
largest of theirs. A stage *jumps* when

    e  >  growth · e_in  +  budget(stage)

`growth` allows the amplification a correct stage shows: 8 for most stages (measured ≤ 4 on SmolLM2, at
attention = softmax·V), 64 for RMSNorm outputs, whose weights re-weight channels so that the small error of
a residual stream dominated by a few huge channels becomes a large relative error (measured up to 36×);
`budget` is the error a stage may add by itself: the float noise floor (1e-4) plus the expected
quantization error of the weights it consumes on either side (`QUANT_BUDGET`, by GGML type), plus
activation quantization when a runtime quantizes activations for quantized matmuls (llama.cpp).
So quantization noise that grows smoothly stays below the line, and a corrupted tensor — a 1 % change
where both sides otherwise agree — jumps at the first stage that consumes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final

from apr.diff.compare import StageDiff, TraceDiff
from apr.trace.stages import Stage, StageId

PREV_OUTPUT: Final = "layer_input"  # post_ffn_residual of the layer before (or the embedding)

STAGE_INPUTS: Final[dict[Stage, tuple[Stage | str, ...]]] = {
    Stage.EMBEDDING: (),
    Stage.ATTN_NORM: (PREV_OUTPUT,),
    Stage.QKV_MATMUL: (Stage.ATTN_NORM,),
    Stage.QKV_BIAS: (Stage.QKV_MATMUL,),
    Stage.Q_POST_ROPE: (Stage.QKV_BIAS, Stage.QKV_MATMUL),
    Stage.K_POST_ROPE: (Stage.QKV_BIAS, Stage.QKV_MATMUL),
    Stage.ATTN_SCORES: (Stage.Q_POST_ROPE, Stage.K_POST_ROPE),
    Stage.ATTN_SOFTMAX: (Stage.ATTN_SCORES,),
    Stage.ATTENTION: (Stage.ATTN_SOFTMAX, Stage.QKV_BIAS, Stage.QKV_MATMUL),
    Stage.ATTN_OUT: (Stage.ATTENTION,),
    Stage.POST_ATTN_RESIDUAL: (Stage.ATTN_OUT, PREV_OUTPUT),
    Stage.FFN_NORM: (Stage.POST_ATTN_RESIDUAL,),
    Stage.FFN_GATE: (Stage.FFN_NORM,),
    Stage.FFN_UP: (Stage.FFN_NORM,),
    Stage.FFN_SILU: (Stage.FFN_GATE,),
    Stage.FFN_SWIGL: (Stage.FFN_SILU, Stage.FFN_GATE, Stage.FFN_UP),
    Stage.FFN_OUT: (Stage.FFN_SWIGL,),
    Stage.POST_FFN_RESIDUAL: (Stage.FFN_OUT, Stage.POST_ATTN_RESIDUAL),
    Stage.FINAL_NORM: (PREV_OUTPUT,),
    Stage.LM_HEAD: (Stage.FINAL_NORM,),
}

# weights (canonical suffixes; layer-prefixed for per-layer stages) each stage consumes
STAGE_WEIGHTS: Final[dict[Stage, tuple[str, ...]]] = {
    Stage.EMBEDDING: ("token_embd.weight",),
    Stage.ATTN_NORM: ("attn_norm.weight",),
    Stage.QKV_MATMUL: ("attn_q.weight", "attn_k.weight", "attn_v.weight"),
    Stage.QKV_BIAS: ("attn_q.bias", "attn_k.bias", "attn_v.bias"),
    Stage.Q_POST_ROPE: ("attn_q_norm.weight",),
    Stage.K_POST_ROPE: ("attn_k_norm.weight",),
    Stage.ATTN_OUT: ("attn_output.weight", "attn_output.bias"),
    Stage.FFN_NORM: ("ffn_norm.weight",),
    Stage.FFN_GATE: ("ffn_gate.weight",),
    Stage.FFN_UP: ("ffn_up.weight",),
    Stage.FFN_OUT: ("ffn_down.weight",),
    Stage.FINAL_NORM: ("output_norm.weight",),
    Stage.LM_HEAD: ("output.weight", "token_embd.weight"),
}

# expected relative L2 error a stage may add by consuming weights of this type (vs exact values)
QUANT_BUDGET: Final[dict[str, float]] = {
    "F32": 0.0, "F64": 0.0, "F16": 2e-3, "BF16": 1e-2, "Q8_0": 1e-2, "Q6_K": 2e-2, "Q5_K": 4e-2,
    "Q5_0": 5e-2, "Q5_1": 5e-2, "Q4_K": 6e-2, "Q4_0": 8e-2, "Q4_1": 8e-2, "Q3_K": 0.15, "Q2_K": 0.3,
    "APR_Q8": 1e-2, "APR_Q4": 8e-2,
}  # fmt: skip
UNKNOWN_TYPE_BUDGET: Final = 0.3
ACTIVATION_QUANT_BUDGET: Final = 2e-2  # llama.cpp quantizes activations to 8 bits for quantized matmuls
FLOAT_TYPES: Final = frozenset({"F32", "F64"})


NORM_STAGES: Final = frozenset({Stage.ATTN_NORM, Stage.FFN_NORM, Stage.FINAL_NORM})
QK_NORM_STAGES: Final = frozenset(
    {Stage.Q_POST_ROPE, Stage.K_POST_ROPE}
)  # normed when the model has q/k norms


@dataclass(frozen=True, slots=True)
class ToleranceModel:
    floor: float = 1e-4
    growth: float = 8.0
    norm_growth: float = 64.0
    activation_quant: tuple[bool, bool] = (False, False)  # per side: does its engine quantize activations

    def growth_for(self, sid: StageId, types: tuple[dict[str, str], dict[str, str]]) -> float:
        normed = sid.stage in NORM_STAGES or (
            sid.stage in QK_NORM_STAGES and any(n in t for t in types for n in _weight_names(sid))
        )
        return self.norm_growth if normed else self.growth

    def budget(self, sid: StageId, types: tuple[dict[str, str], dict[str, str]]) -> float:
        extra = 0.0
        for side, table in enumerate(types):
            names = _weight_names(sid)
            present = [table[n] for n in names if n in table]
            quant = [t for t in present if t not in FLOAT_TYPES]
            extra += max((QUANT_BUDGET.get(t, UNKNOWN_TYPE_BUDGET) for t in present), default=0.0)
            if quant and self.activation_quant[side] and _is_matmul(sid.stage):
                extra += ACTIVATION_QUANT_BUDGET
        return self.floor + extra


def _is_matmul(stage: Stage) -> bool:
    return stage in (
        Stage.QKV_MATMUL,
        Stage.ATTN_OUT,
        Stage.FFN_GATE,
        Stage.FFN_UP,
        Stage.FFN_OUT,
        Stage.LM_HEAD,
    )


def _weight_names(sid: StageId) -> list[str]:
    suffixes = STAGE_WEIGHTS.get(sid.stage, ())
    if sid.layer is None or sid.stage is Stage.EMBEDDING:
        return list(suffixes)
    return [f"blk.{sid.layer}.{s}" for s in suffixes]


@dataclass(frozen=True, slots=True)
class GrowthRow:
    diff: StageDiff
    error: float  # relative L2 error of this stage
    input_error: float  # largest relative L2 error among its inputs
    budget: float
    allowed: float  # growth · input_error + budget
    jump: bool  # error > allowed

    @property
    def growth(self) -> float:
        """e / e_in (inf when the inputs were exact)."""
        if self.input_error == 0.0:
            return math.inf if self.error > 0 else 1.0
        return self.error / self.input_error


@dataclass(frozen=True, slots=True)
class GrowthReport:
    rows: list[GrowthRow]
    model: ToleranceModel
    notes: list[str] = field(default_factory=list)

    @property
    def first_jump(self) -> GrowthRow | None:
        return next((r for r in self.rows if r.jump), None)


def _error(d: StageDiff) -> float:
    e = d.metrics.rel_l2
    return math.inf if math.isnan(e) or d.metrics.nan_count else e


def _input_ids(sid: StageId, present: dict[StageId, float], last_layer: int) -> list[StageId]:
    ids: list[StageId] = []
    for inp in STAGE_INPUTS[sid.stage]:
        if inp == PREV_OUTPUT:
            layer = last_layer if sid.layer is None else sid.layer - 1
            ids.append(StageId(Stage.POST_FFN_RESIDUAL, layer) if layer >= 0 else StageId(Stage.EMBEDDING, 0))
        else:
            assert isinstance(inp, Stage)
            ids.append(
                StageId(inp, sid.layer if sid.layer is not None else 0) if inp.per_layer else StageId(inp)
            )
    return [i for i in ids if i in present]


def analyze(
    diff: TraceDiff, model: ToleranceModel, types: tuple[dict[str, str], dict[str, str]]
) -> GrowthReport:
    """Classify every compared stage of `diff` (side A = reference) under the tolerance model."""
    errors = {r.sid: _error(r) for r in diff.rows}
    last_layer = max((s.layer for s in errors if s.layer is not None), default=0)
    rows = []
    for r in diff.rows:
        inputs = _input_ids(r.sid, errors, last_layer)
        e_in = max((errors[i] for i in inputs), default=0.0)
        budget = model.budget(r.sid, types)
        allowed = model.growth_for(r.sid, types) * e_in + budget
        rows.append(GrowthRow(r, errors[r.sid], e_in, budget, allowed, jump=errors[r.sid] > allowed))
    notes = []
    if not any(t for t in types):
        notes.append("weight types unknown (traces without manifests): budgets assume float weights")
    return GrowthReport(rows, model, notes)
