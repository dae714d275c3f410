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
activation quantization when a runtime quantizes activations for quantized matmuls (llama.cpp) — unless
the other side emulates that arithmetic (`--precision ggml`, EMULATED_BUDGET).
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
from apr.quant.vecdot_lanes import LANE_TYPES
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
# `--precision ggml` against llama.cpp (ToleranceModel.ggml_matched): for a weight of the same type on both
# sides whose kernels apr.quant.vecdot_lanes runs in ggml's own order, the activations are quantized as
# llama.cpp does and the dot products summed in its order, so the two agree to an ulp (tests/engine/
# test_ggml_precision.py: Q8_0 every stage ≤ 3.1e-7; Q4_1 one Q8_1 rounding flip, 2.6e-4 at blk.29).
# The weight and activation budgets are replaced by EMULATED_BUDGET; other types keep theirs.
EMULATED_TYPES: Final = frozenset({t.name for t in LANE_TYPES}) | FLOAT_TYPES
EMULATED_BUDGET: Final = 3e-4


@dataclass(frozen=True, slots=True)
class ToleranceModel:
    floor: float = 1e-4
    growth: float = 8.0
    norm_growth: float = 64.0
    activation_quant: tuple[bool, bool] = (False, False)  # per side: does its engine quantize activations
    emulates_ggml: tuple[bool, bool] = (False, False)  # per side: the reference engine's --precision ggml

    @property
    def ggml_matched(self) -> bool:
        """Both sides do ggml-cpu's quantized arithmetic, at least one through the emulation."""
        ggml = [q or e for q, e in zip(self.activation_quant, self.emulates_ggml, strict=True)]
        return all(ggml) and any(self.emulates_ggml)

    def growth_for(self, node: StageNode | None) -> float:
        return self.norm_growth if node is not None and node.norm else self.growth

    def budget(
        self, sid: StageId, node: StageNode | None, types: tuple[dict[str, str], dict[str, str]]
    ) -> float:
        if self.ggml_matched and _same_emulated(_weight_names(sid, node), types):
            quantized = any(types[0].get(n, "F32") not in FLOAT_TYPES for n in _weight_names(sid, node))
            matmul = node is not None and node.matmul
            return self.floor + (EMULATED_BUDGET if quantized and matmul else 0.0)
        extra = 0.0
        for side, table in enumerate(types):
            names = _weight_names(sid, node)
            present = [table[n] for n in names if n in table]
            quant = [t for t in present if t not in FLOAT_TYPES]
            extra += max((QUANT_BUDGET.get(t, UNKNOWN_TYPE_BUDGET) for t in present), default=0.0)
            if quant and self.activation_quant[side] and node is not None and node.matmul:
                extra += ACTIVATION_QUANT_BUDGET
        return self.floor + extra


def _same_emulated(names: list[str], types: tuple[dict[str, str], dict[str, str]]) -> bool:
    """Every weight has the same type on both sides, one whose kernels the emulation runs in ggml's order."""
    return all(types[0].get(n) == types[1].get(n) and types[0].get(n, "F32") in EMULATED_TYPES for n in names)


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


def classify(
    errors: dict[StageId, float],
    model: ToleranceModel,
    types: tuple[dict[str, str], dict[str, str]],
    graph: tuple[StageNode, ...] | None = None,
    prior: dict[StageId, float] | None = None,
) -> dict[StageId, tuple[float, float, float, float, bool]]:
    """The growth rule on bare errors: per stage (error, input error, budget, allowed, jump). An input
    missing from `errors` takes its error from `prior` when it is there (else it does not count)."""
    nodes = {n.stage: n for n in (graph or stage_graph(None))}
    known = {**(prior or {}), **errors}
    last_layer = max((s.layer for s in known if s.layer is not None), default=0)
    out = {}
    for sid, e in errors.items():
        node = nodes.get(sid.stage)
        inputs = _input_ids(sid, node, known, last_layer)
        e_in = max((known[i] for i in inputs), default=0.0)
        budget = model.budget(sid, node, types)
        allowed = model.growth_for(node) * e_in + budget
        out[sid] = (e, e_in, budget, allowed, e > allowed)
    return out


def analyze(
    diff: TraceDiff,
    model: ToleranceModel,
    types: tuple[dict[str, str], dict[str, str]],
    graph: tuple[StageNode, ...] | None = None,
    prior: dict[StageId, float] | None = None,
) -> GrowthReport:
    """Classify every compared stage of `diff` (side A = reference) under the tolerance model, with the
    data flow of `graph` (the traced family's; default: every stage aprender names). `prior`: errors of
    stages outside the diff (bisect's statistics phase) that inputs may take theirs from."""
    errors = {r.sid: _error(r) for r in diff.rows}
    judged = classify(errors, model, types, graph, prior)
    rows = [GrowthRow(r, *judged[r.sid]) for r in diff.rows]
    notes = []
    if not any(t for t in types):
        notes.append("weight types unknown (traces without manifests): budgets assume float weights")
    return GrowthReport(rows, model, notes)
