"""`apr trace --payload`: per-layer activation statistics of one forward pass (aprender's APR-TRACE-001).

A Tap that keeps summary statistics instead of tensors: min, max, mean, population std, NaN/Inf/zero
counts per captured stage, plus the top-5 logits of the last position. Works for every format and engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from apr.stages import Stage, StageId
from apr.trace.run import PreparedTrace, TraceOptions, engine_fn

# aprender's per-layer report columns → the stage each one summarizes
LAYER_COLUMNS: Final[dict[str, tuple[Stage, ...]]] = {
    "attn_norm": (Stage.ATTN_NORM,),
    "qkv": (Stage.QKV_BIAS, Stage.QKV_MATMUL),  # after the bias when the model has one
    "attn_out": (Stage.ATTN_OUT,),
    "ffn_norm": (Stage.FFN_NORM,),
    "ffn_gate": (Stage.FFN_GATE,),
    "ffn_up": (Stage.FFN_UP,),
    "ffn_silu": (Stage.FFN_SILU,),
    "ffn_swigl": (Stage.FFN_SWIGL,),
    "ffn_out": (Stage.FFN_OUT,),
    "output": (Stage.POST_FFN_RESIDUAL,),
}
TOP_K: Final = 5


@dataclass(frozen=True, slots=True)
class ActivationStats:
    min: float
    max: float
    mean: float
    std_dev: float
    nan_count: int
    inf_count: int
    zero_count: int
    count: int

    @classmethod
    def of(cls, x: npt.NDArray[Any]) -> ActivationStats:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        finite = x[np.isfinite(x)]
        if finite.size == 0:
            lo = hi = mean = std = float("nan")
        else:
            lo, hi = float(finite.min()), float(finite.max())
            mean, std = float(finite.mean()), float(finite.std())
        return cls(
            lo, hi, mean, std,
            int(np.isnan(x).sum()), int(np.isinf(x).sum()), int((x == 0).sum()), int(x.size),
        )  # fmt: skip

    @property
    def anomalous(self) -> bool:
        return self.nan_count > 0 or self.inf_count > 0


@dataclass
class PayloadReport:
    prepared: PreparedTrace
    stats: dict[StageId, ActivationStats] = field(default_factory=dict)
    top_k: list[tuple[int, float]] = field(default_factory=list)
    logits_l2: float = 0.0

    def __call__(self, sid: StageId, value: npt.NDArray[Any], /) -> None:
        self.stats[sid] = ActivationStats.of(value)
        if sid.stage is Stage.LM_HEAD:
            last = np.asarray(value, dtype=np.float64).reshape(-1, value.shape[-1])[-1]
            order = np.argsort(-last, kind="stable")[:TOP_K]
            self.top_k = [(int(i), float(last[i])) for i in order]
            self.logits_l2 = float(np.linalg.norm(last))

    def layer_stats(self, layer: int) -> dict[str, ActivationStats]:
        out = {}
        for column, stages in LAYER_COLUMNS.items():
            found = next(
                (self.stats[StageId(s, layer)] for s in stages if StageId(s, layer) in self.stats), None
            )
            if found is not None:
                out[column] = found
        return out


def run_payload(prepared: PreparedTrace, options: TraceOptions) -> PayloadReport:
    """One forward pass with a statistics tap (no files written)."""
    report = PayloadReport(prepared)
    engine_fn(options)(prepared.path, prepared.model, prepared.token_ids, report, options)
    return report
