"""Element-wise comparison metrics, as pure functions over two flat float arrays.

NaN policy (aprender's, spec §4.3): |a−b| is computed in f32; the running maximum only moves on a strictly
larger value, so the first maximum wins and a NaN never wins; sums are accumulated in f64, so a NaN input
makes RMS / cosine / relative error NaN. Cosine is 0.0 when either norm is 0. Top-N ranks NaN differences
first (they are the most divergent thing there is), then by |Δ| descending, stable on index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class ElementDiff:
    index: int
    a: float
    b: float
    abs_diff: float


@dataclass(frozen=True, slots=True)
class Metrics:
    n: int
    max_abs: float  # f32 value
    max_index: int
    rms: float  # f32 value
    cosine: float  # f64
    rel_l2: float  # ‖a−b‖ / ‖b‖ (b is the reference); 0 if both are 0, inf if only b is 0
    sqnr_db: float  # 10·log10(‖b‖² / ‖a−b‖²); inf when identical
    a_at_max: float
    b_at_max: float
    nan_count: int  # positions where either side is NaN


def abs_diff(a: F32, b: F32) -> F32:
    return np.abs(a.astype(np.float32, copy=False) - b.astype(np.float32, copy=False))


def first_max(d: F32) -> tuple[float, int]:
    """aprender's running max: starts at (0.0, 0), moves only on d > max; NaN never wins."""
    if d.size == 0:
        return 0.0, 0
    masked = np.where(np.isnan(d), np.float32(-1.0), d)
    i = int(np.argmax(masked))
    if masked[i] <= 0.0:
        return 0.0, 0
    return float(d[i]), i


def compare(a: F32, b: F32) -> Metrics:
    """All metrics at once. `a` and `b` must have the same size (callers check and explain)."""
    a = np.asarray(a, dtype=np.float32).reshape(-1)
    b = np.asarray(b, dtype=np.float32).reshape(-1)
    n = a.size
    d = abs_diff(a, b)
    max_abs, idx = first_max(d)
    d64 = d.astype(np.float64)
    sum_sq = float(np.dot(d64, d64))
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    na, nb = float(np.dot(a64, a64)), float(np.dot(b64, b64))
    dot = float(np.dot(a64, b64))
    cosine = 0.0 if na == 0.0 or nb == 0.0 else dot / (math.sqrt(na) * math.sqrt(nb))
    rms = float(np.float32(math.sqrt(sum_sq / n))) if n else 0.0
    return Metrics(
        n=n,
        max_abs=max_abs,
        max_index=idx,
        rms=rms,
        cosine=cosine,
        rel_l2=_ratio(math.sqrt(sum_sq), math.sqrt(nb)),
        sqnr_db=_sqnr(nb, sum_sq),
        a_at_max=float(a[idx]) if n else 0.0,
        b_at_max=float(b[idx]) if n else 0.0,
        nan_count=int(np.count_nonzero(np.isnan(a) | np.isnan(b))),
    )


def _ratio(num: float, den: float) -> float:
    if math.isnan(num) or math.isnan(den):
        return math.nan
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _sqnr(signal: float, noise: float) -> float:
    if math.isnan(signal) or math.isnan(noise):
        return math.nan
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def top_diffs(a: F32, b: F32, limit: int) -> list[ElementDiff]:
    """The `max(limit, 1)` largest |a−b|, NaN first, then descending, ties by index."""
    a = np.asarray(a, dtype=np.float32).reshape(-1)
    b = np.asarray(b, dtype=np.float32).reshape(-1)
    d = abs_diff(a, b)
    key = np.where(np.isnan(d), np.float32(np.inf), d)
    k = min(max(limit, 1), d.size)
    order = np.argsort(-key, kind="stable")[:k]
    return [ElementDiff(int(i), float(a[i]), float(b[i]), float(d[i])) for i in order]
