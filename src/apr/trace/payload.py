"""`apr trace --payload`: per-layer activation statistics of one forward pass (aprender's APR-TRACE-001).

A Tap that keeps summary statistics instead of tensors: min, max, mean, population std, NaN/Inf/zero
counts per captured stage, plus the top-5 logits of the last position. Works for every format and engine.

Warnings are relative to the model's own layers, not fixed numbers (a healthy SmolLM2-135M has layer outputs
of std ~393 from layer 11 on — a "massive activation" — and an ffn_out 144× its median at that layer):
- any NaN / Inf: always;
- a layer output (the residual stream) whose std exceeds OUTPUT_K × the median of the layers' output stds;
- any stage whose std exceeds STAGE_K × the median of that stage's std over the layers.
aprender's fixed thresholds (output std > 50, logit range outside [1, 100]) are kept as information only
(`fixed_rule_info`): on that healthy model the first fires on 19 layers.
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
OUTPUT_K: Final = 10.0  # × the median of the layers' output std
STAGE_K: Final = 1000.0  # × the median of the same stage's std over the layers (healthy SmolLM2: ≤ 144)
APRENDER_OUTPUT_STD: Final = 50.0  # aprender's fixed "layer N output std > 50" warning: information only
APRENDER_LOGIT_RANGE: Final = (1.0, 100.0)


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

    def _by_stage(self) -> dict[Stage, dict[int, ActivationStats]]:
        out: dict[Stage, dict[int, ActivationStats]] = {}
        for sid, st in self.stats.items():
            if sid.layer is not None and sid.stage is not Stage.EMBEDDING:
                out.setdefault(sid.stage, {})[sid.layer] = st
        return out

    def warnings(self) -> list[str]:
        """What looks wrong relative to this model's own layers (see the module docstring)."""
        out = [
            f"{sid}: {st.nan_count} NaN, {st.inf_count} Inf"
            for sid, st in sorted(self.stats.items(), key=lambda kv: kv[0].sort_key)
            if st.anomalous
        ]
        outliers: list[tuple[StageId, str]] = []
        for stage, layers in self._by_stage().items():
            k = OUTPUT_K if stage is Stage.POST_FFN_RESIDUAL else STAGE_K
            median = float(np.median([st.std_dev for st in layers.values()]))
            name = "output" if stage is Stage.POST_FFN_RESIDUAL else stage.value
            rule = f"{k:g}× its median over the layers ({median:.4g})"
            outliers += [
                (StageId(stage, i), f"layer {i} {name} std {st.std_dev:.4g} > {rule}")
                for i, st in layers.items()
                if median > 0 and st.std_dev > k * median
            ]
        return out + [text for _, text in sorted(outliers, key=lambda x: x[0].sort_key)]

    def fixed_rule_info(self) -> list[str]:
        """aprender's fixed thresholds, reported for comparison (not warnings)."""
        out = []
        outputs = self._by_stage().get(Stage.POST_FFN_RESIDUAL, {})
        over = [i for i, st in sorted(outputs.items()) if st.std_dev > APRENDER_OUTPUT_STD]
        if over:
            out.append(
                f"aprender's fixed rule (output std > {APRENDER_OUTPUT_STD:g}) fires on {len(over)} of "
                f"{len(outputs)} layers (first: layer {over[0]})"
            )
        lg = self.stats.get(StageId(Stage.LM_HEAD))
        lo, hi = APRENDER_LOGIT_RANGE
        if lg is not None and not lo <= lg.max - lg.min <= hi:
            out.append(
                f"aprender's fixed rule: logit range {lg.max - lg.min:.2f} is outside [{lo:g}, {hi:g}]"
            )
        return out


def run_payload(prepared: PreparedTrace, options: TraceOptions) -> PayloadReport:
    """One forward pass with a statistics tap (no files written)."""
    report = PayloadReport(prepared)
    engine_fn(options)(prepared.path, prepared.model, prepared.token_ids, report, options)
    return report
