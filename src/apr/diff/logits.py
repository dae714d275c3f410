"""Logit agreement between two runs, per position: KL divergence, top-1 agreement, top-5 overlap.

Side A is the reference: KL(P_A ‖ P_B) with P = softmax(logits) in f64 (llama-perplexity's direction).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

TOP_K: Final = 5


@dataclass(frozen=True, slots=True)
class LogitAgreement:
    positions: int
    kl: list[float]  # per position
    top1_agree: list[bool]
    top5_overlap: list[float]  # |top5(A) ∩ top5(B)| / 5
    top1_a: list[int] = field(default_factory=list)  # each side's top-1 token id per position
    top1_b: list[int] = field(default_factory=list)
    top_k_a: list[int] = field(default_factory=list)  # each side's TOP_K ids at the last position, best first
    top_k_b: list[int] = field(default_factory=list)
    top_k_p_a: list[float] = field(default_factory=list)  # their probabilities (softmax in f64)
    top_k_p_b: list[float] = field(default_factory=list)

    @property
    def kl_mean(self) -> float:
        return float(np.mean(self.kl))

    @property
    def kl_max(self) -> float:
        return float(np.max(self.kl))

    @property
    def top1_rate(self) -> float:
        return float(np.mean(self.top1_agree))

    @property
    def top5_mean(self) -> float:
        return float(np.mean(self.top5_overlap))


def _log_softmax(x: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    out: npt.NDArray[np.float64] = x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
    return out


def compare_logits(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> LogitAgreement:
    """`a`, `b`: (positions, vocab) or (vocab,) logits of the same tokens."""
    a2, b2 = np.atleast_2d(a), np.atleast_2d(b)
    la, lb = _log_softmax(a2), _log_softmax(b2)
    kl = (np.exp(la) * (la - lb)).sum(axis=-1)
    top_a = np.argsort(-a2, axis=-1, kind="stable")[:, :TOP_K]
    top_b = np.argsort(-b2, axis=-1, kind="stable")[:, :TOP_K]
    overlap = [len(set(x) & set(y)) / TOP_K for x, y in zip(top_a.tolist(), top_b.tolist(), strict=True)]
    return LogitAgreement(
        positions=a2.shape[0],
        kl=[float(v) for v in kl],
        top1_agree=[bool(x) for x in top_a[:, 0] == top_b[:, 0]],
        top5_overlap=overlap,
        top1_a=[int(i) for i in top_a[:, 0]],
        top1_b=[int(i) for i in top_b[:, 0]],
        top_k_a=[int(i) for i in top_a[-1]],
        top_k_b=[int(i) for i in top_b[-1]],
        top_k_p_a=[float(np.exp(la[-1, i])) for i in top_a[-1]],
        top_k_p_b=[float(np.exp(lb[-1, i])) for i in top_b[-1]],
    )
