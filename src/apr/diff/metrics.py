"""Element-wise comparison metrics, as pure functions over two flat float arrays.

NaN policy (aprender's, spec §4.3): |a−b| is computed in f32; the running maximum only moves on a strictly
larger value, so the first maximum wins and a NaN never wins; sums are accumulated in f64, so a NaN input
makes RMS / cosine / relative error NaN. Cosine is 0.0 when either norm is 0. Top-N ranks NaN differences
first (they are the most divergent thing there is), then by |Δ| descending, stable on index.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
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


CHUNK = 1 << 20  # elements per pass: ~30 MB of temporaries whatever the stage's size


class _Running:
    """Metrics accumulated over chunks: f64 sums, aprender's first maximum, the NaN count, the top-k."""

    def __init__(self, limit: int) -> None:
        self.n, self.max_abs, self.idx, self.a_max, self.b_max = 0, 0.0, 0, 0.0, 0.0
        self.sum_sq = self.na = self.nb = self.dot = 0.0
        self.nans, self.limit = 0, limit
        self.first = (0.0, 0.0)  # a[0], b[0]: aprender reports them when nothing differs
        self.top: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], F32, F32] | None = None

    def add(self, a: F32, b: F32) -> None:
        if self.n == 0 and a.size:
            self.first = (float(a[0]), float(b[0]))
        d = abs_diff(a, b)
        m, i = first_max(d)
        if m > self.max_abs:
            self.max_abs, self.idx, self.a_max, self.b_max = m, self.n + i, float(a[i]), float(b[i])
        d64, a64, b64 = d.astype(np.float64), a.astype(np.float64), b.astype(np.float64)
        self.sum_sq += float(np.dot(d64, d64))
        self.na, self.nb = self.na + float(np.dot(a64, a64)), self.nb + float(np.dot(b64, b64))
        self.dot += float(np.dot(a64, b64))
        self.nans += int(np.count_nonzero(np.isnan(a) | np.isnan(b)))
        if self.limit:
            self._keep_top(d, a, b)
        self.n += a.size

    def _keep_top(self, d: F32, a: F32, b: F32) -> None:
        key = np.where(np.isnan(d), np.float32(np.inf), d)
        best = np.argsort(-key, kind="stable")[: self.limit]
        key, at, a, b = key[best], best + self.n, a[best], b[best]
        if self.top is not None:
            tk, ta, tx, ty = self.top
            key, at, a, b = (
                np.concatenate([tk, key]),
                np.concatenate([ta, at]),
                np.concatenate([tx, a]),
                np.concatenate([ty, b]),
            )
        keep = np.lexsort((at, -key))[: self.limit]
        self.top = (key[keep], at[keep], a[keep], b[keep])

    def metrics(self) -> Metrics:
        n, nb = self.n, self.nb
        cosine = 0.0 if self.na == 0.0 or nb == 0.0 else self.dot / (math.sqrt(self.na) * math.sqrt(nb))
        return Metrics(
            n=n,
            max_abs=self.max_abs,
            max_index=self.idx,
            rms=float(np.float32(math.sqrt(self.sum_sq / n))) if n else 0.0,
            cosine=cosine,
            rel_l2=_ratio(math.sqrt(self.sum_sq), math.sqrt(nb)),
            sqnr_db=_sqnr(nb, self.sum_sq),
            a_at_max=self.a_max if self.max_abs else self.first[0],
            b_at_max=self.b_max if self.max_abs else self.first[1],
            nan_count=self.nans,
        )

    def diffs(self) -> list[ElementDiff]:
        if self.top is None:
            return []
        _, at, a, b = self.top
        d = abs_diff(a, b)
        return [
            ElementDiff(int(i), float(x), float(y), float(z)) for i, x, y, z in zip(at, a, b, d, strict=True)
        ]


def compare_chunks(chunks: Iterable[tuple[F32, F32]], limit: int = 0) -> tuple[Metrics, list[ElementDiff]]:
    """Metrics (and the `limit` largest differences) of two tensors given as matching chunk pairs, so a
    stage of any size is compared in bounded memory (apr.trace.format.iter_values reads them)."""
    run = _Running(limit)
    for k, (a, b) in enumerate(chunks):
        if a.size != b.size:
            raise ValueError(f"chunk {k}: {a.size} vs {b.size} values")  # callers pair equal sizes
        run.add(np.asarray(a, np.float32).reshape(-1), np.asarray(b, np.float32).reshape(-1))
    return run.metrics(), run.diffs()


def sliced(a: F32, b: F32) -> Iterator[tuple[F32, F32]]:
    a = np.asarray(a, dtype=np.float32).reshape(-1)
    b = np.asarray(b, dtype=np.float32).reshape(-1)
    for lo in range(0, a.size, CHUNK):
        yield a[lo : lo + CHUNK], b[lo : lo + CHUNK]


def compare(a: F32, b: F32) -> Metrics:
    """All metrics at once. `a` and `b` must have the same size (callers check and explain)."""
    return compare_chunks(sliced(a, b))[0]


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
    return compare_chunks(sliced(a, b), max(limit, 1))[1]
