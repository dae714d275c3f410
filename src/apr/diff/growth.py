"""Error growth: tell a stage that *makes* error from one that only carries the error of its inputs.

Each stage's error e is the relative L2 error ‖a−b‖/‖b‖ against side A (the reference). Its inputs are the
stages it is computed from (the family's stage graph, apr.models: the data flow of the decoder), and its
input error e_in is the largest of theirs. A stage *jumps* when

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
from apr.models.base import PREV_OUTPUT, StageNode
from apr.models.registry import stage_graph
from apr.stages import Stage, StageId

# expected relative L2 error a stage may add by consuming weights of this type (vs exact values)
QUANT_BUDGET: Final[dict[str, float]] = {
    "F32": 0.0, "F64": 0.0, "F16": 2e-3, "BF16": 1e-2, "Q8_0": 1e-2, "Q6_K": 2e-2, "Q5_K": 4e-2,
    "Q5_0": 5e-2, "Q5_1": 5e-2, "Q4_K": 6e-2, "Q4_0": 8e-2, "Q4_1": 8e-2, "Q3_K": 0.15, "Q2_K": 0.3,
    "APR_Q8": 1e-2, "APR_Q4": 8e-2,
}  # fmt: skip
UNKNOWN_TYPE_BUDGET: Final = 0.3
ACTIVATION_QUANT_BUDGET: Final = 2e-2  # llama.cpp quantizes activations to 8 bits for quantized matmuls
FLOAT_TYPES: Final = frozenset({"F32", "F64"})


@dataclass(frozen=True, slots=True)
class ToleranceModel:
    floor: float = 1e-4
    growth: float = 8.0
    norm_growth: float = 64.0
    activation_quant: tuple[bool, bool] = (False, False)  # per side: does its engine quantize activations

    def growth_for(self, node: StageNode | None) -> float:
        return self.norm_growth if node is not None and node.norm else self.growth

    def budget(
        self, sid: StageId, node: StageNode | None, types: tuple[dict[str, str], dict[str, str]]
    ) -> float:
        extra = 0.0
        for side, table in enumerate(types):
            names = _weight_names(sid, node)
            present = [table[n] for n in names if n in table]
            quant = [t for t in present if t not in FLOAT_TYPES]
            extra += max((QUANT_BUDGET.get(t, UNKNOWN_TYPE_BUDGET) for t in present), default=0.0)
            if quant and self.activation_quant[side] and node is not None and node.matmul:
                extra += ACTIVATION_QUANT_BUDGET
        return self.floor + extra


def _weight_names(sid: StageId, node: StageNode | None) -> list[str]:
    layer = 0 if sid.layer is None else sid.layer
    return [w.format(i=layer) for w in (node.weights if node else ())]


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


def _input_ids(
    sid: StageId, node: StageNode | None, present: dict[StageId, float], last_layer: int
) -> list[StageId]:
    ids: list[StageId] = []
    for inp in node.inputs if node else ():
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
    diff: TraceDiff,
    model: ToleranceModel,
    types: tuple[dict[str, str], dict[str, str]],
    graph: tuple[StageNode, ...] | None = None,
) -> GrowthReport:
    """Classify every compared stage of `diff` (side A = reference) under the tolerance model, with the
    data flow of `graph` (the traced family's; default: every stage aprender names)."""
    nodes = {n.stage: n for n in (graph or stage_graph(None))}
    errors = {r.sid: _error(r) for r in diff.rows}
    last_layer = max((s.layer for s in errors if s.layer is not None), default=0)
    rows = []
    for r in diff.rows:
        node = nodes.get(r.sid.stage)
        inputs = _input_ids(r.sid, node, errors, last_layer)
        e_in = max((errors[i] for i in inputs), default=0.0)
        budget = model.budget(r.sid, node, types)
        allowed = model.growth_for(node) * e_in + budget
        rows.append(GrowthRow(r, errors[r.sid], e_in, budget, allowed, jump=errors[r.sid] > allowed))
    notes = []
    if not any(t for t in types):
        notes.append("weight types unknown (traces without manifests): budgets assume float weights")
    return GrowthReport(rows, model, notes)
