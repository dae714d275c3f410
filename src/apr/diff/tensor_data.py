"""Whether two models' tensors hold the same data: every tensor both store alike, read in full, streaming.

For each canonical name both sides have with the same shape and the same type:

- stored alike (the usual case): the stored bytes, compared `CHUNK_BYTES` at a time (an HF per-expert
  stack as its experts' bytes in order, which is how a GGUF stacks them), stopping at the first difference;
- stored differently for the same math (the config says so: `qk_layout`, `norm_offset`): the values the
  forward uses, read `VALUE_CHUNK` elements at a time — attn_q / attn_k rows put in HF order
  (apr.formats.config.interleaved_to_hf, head by head), each norm weight plus its side's offset.

Where bytes differ, the first `DETAILED` such tensors are also read as values for their max |a − b| (the
others are named only); values that are all equal (+0 / −0, NaN payloads) are not a difference in the math.
Tensors whose types differ are not compared (`skipped`, with the reason): equal values cannot be expected.
Memory stays at a few chunks whatever the model; time is one read of both files (tens of GB for a 7B pair).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from apr.formats.config import QKLayout, interleaved_to_hf, qk_heads
from apr.formats.names import OUTPUT, TOKEN_EMBD
from apr.models import Model

CHUNK_BYTES: Final = 16 << 20  # stored bytes per side per comparison step
VALUE_CHUNK: Final = 4 << 20  # float32 values per side per step
DETAILED: Final = 8  # byte-differing tensors whose values are read for max |a − b|
TYPES_DIFFER: Final = "types differ: precision only"
NOT_ASKED: Final = "not asked for"

F32 = npt.NDArray[np.float32]
Transform = Callable[[F32], F32]
OnTensor = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class DataDiff:
    name: str
    max_abs: float | None  # of the values (NaN against a number: nan); None: not read (beyond DETAILED)
    how: str = "bytes"  # "bytes" (stored bytes compared), "values" (stored differently, values compared)

    @property
    def changes_math(self) -> bool:
        return self.max_abs != 0.0  # None: unknown, so a difference


@dataclass(frozen=True, slots=True)
class DataCheck:
    compared: int  # tensors whose data was compared
    differ: list[DataDiff] = field(default_factory=list)  # of those, the ones whose data differs
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (tensor, why its data was not compared)

    @property
    def differs(self) -> bool:
        return any(d.changes_math for d in self.differ)


def skip_data(a: Model, b: Model) -> DataCheck:
    """No data read: every tensor both have with the same shape is `skipped`."""
    return DataCheck(0, skipped=[(n, NOT_ASKED) for n in paired_names(a, b)])


def compare_data(a: Model, b: Model, on_tensor: OnTensor | None = None) -> DataCheck:
    """Compare the data of every tensor both models have with the same shape (see the module docstring);
    `on_tensor(i)` hears of each one compared, out of `len(paired_names(a, b))`."""
    compared = 0
    differ: list[DataDiff] = []
    skipped: list[tuple[str, str]] = []
    tied = tied_lm_head(a, b)
    pairs = [(n, n) for n in paired_names(a, b)] + ([tied] if tied is not None else [])
    for i, (name, name_b) in enumerate(pairs):
        shown = name if name == name_b else f"{name} (B: {name_b}, tied)"
        if a.info(name).qtype != b.info(name_b).qtype:
            skipped.append((shown, TYPES_DIFFER))
        else:
            compared += 1
            detail = sum(d.how == "bytes" for d in differ) < DETAILED
            if (found := _compare(a, b, name, detail, name_b)) is not None:
                differ.append(DataDiff(shown, found.max_abs, found.how))
        if on_tensor is not None:
            on_tensor(i)
    return DataCheck(compared, differ, skipped)


def tied_lm_head(a: Model, b: Model) -> tuple[str, str] | None:
    """(A's name, B's name) of the lm_head matrix when one side stores it as output.weight and the other
    has none, so computes its logits with token_embd (tied embeddings, as apr's engine does): the same
    math stored differently (`apr import` writes a tied GGUF's lm_head out)."""
    ta, tb = {t.name: t for t in a.tensors()}, {t.name: t for t in b.tensors()}
    for x, y, pair in ((ta, tb, (OUTPUT, TOKEN_EMBD)), (tb, ta, (TOKEN_EMBD, OUTPUT))):
        if OUTPUT in x and OUTPUT not in y and TOKEN_EMBD in y and y[TOKEN_EMBD].shape == x[OUTPUT].shape:
            return pair
    return None


def paired_names(a: Model, b: Model) -> list[str]:
    """The tensors whose data can be compared: both sides have them, with the same shape."""
    tb = {t.name: t for t in b.tensors()}
    return [t.name for t in a.tensors() if t.name in tb and tb[t.name].shape == t.shape]


def _compare(a: Model, b: Model, name: str, detail: bool, name_b: str | None = None) -> DataDiff | None:
    """A's `name` against B's `name_b` (default: the same name)."""
    nb = name_b or name
    transforms = _transforms(a, b, name) if nb == name else None
    if transforms is not None:
        m = _max_abs(a, b, name, transforms)
        return None if m == 0.0 else DataDiff(name, m, "values")
    if _same_bytes(a, b, name, nb):
        return None
    return DataDiff(name, _max_abs(a, b, name, (_keep, _keep), nb) if detail else None)


def _keep(x: F32) -> F32:
    return x


def _transforms(a: Model, b: Model, name: str) -> tuple[Transform, Transform] | None:
    """How each side's values become the forward's, when the two store them differently (else None)."""
    ca, cb = a.config, b.config
    if ca.qk_layout != cb.qk_layout and _is_qk(name):
        dh = ca.head_dim

        def to_hf(x: F32) -> F32:
            return interleaved_to_hf(x, x.shape[0] // dh, axis=0)

        fa, fb = (to_hf if c.qk_layout is QKLayout.INTERLEAVED else _keep for c in (ca, cb))
        return fa, fb
    if ca.norm_offset != cb.norm_offset and name.endswith("norm.weight"):
        return _shift(ca.norm_offset), _shift(cb.norm_offset)
    return None


def _is_qk(name: str) -> bool:
    return qk_heads(name, 1, 1) is not None


def _shift(offset: float) -> Transform:
    return lambda x: x + np.float32(offset)


def _same_bytes(a: Model, b: Model, name: str, name_b: str) -> bool:
    n = a.info(name).nbytes
    if b.info(name_b).nbytes != n:
        return False
    return all(
        np.array_equal(_raw(a, name, i, min(n, i + CHUNK_BYTES)), _raw(b, name_b, i, min(n, i + CHUNK_BYTES)))
        for i in range(0, n, CHUNK_BYTES)
    )


def _raw(m: Model, name: str, start: int, stop: int) -> npt.NDArray[np.uint8]:
    """Bytes [start, stop) of the tensor; of a per-expert stack, across its parts' bytes in order."""
    parts = m.info(name).parts
    if not parts:
        return m.raw_range(name, start, stop)
    size = m.info(name).nbytes // len(parts)
    pieces = [
        m.ckpt.raw_range(parts[e], max(start, e * size) - e * size, min(stop, (e + 1) * size) - e * size)
        for e in range(start // size, (stop - 1) // size + 1)
    ]
    return np.concatenate(pieces)


def _max_abs(
    a: Model, b: Model, name: str, transforms: tuple[Transform, Transform], name_b: str | None = None
) -> float:
    """max |a − b| of the values of A's `name` and B's `name_b` (default the same; 0.0 when all equal,
    NaN facing NaN counting as equal)."""
    worst = 0.0
    for rows in _row_chunks(a, name):
        sides = zip((a, b), (name, name_b or name), transforms, strict=True)
        x, y = (f(_values(m, n, rows)) for m, n, f in sides)
        same = (x == y) | (np.isnan(x) & np.isnan(y))
        if same.all():
            continue
        d = np.abs(x[~same].astype(np.float64) - y[~same].astype(np.float64))
        worst = float("nan") if np.isnan(d).any() else max(worst, float(d.max()))
        if np.isnan(worst):
            return worst
    return worst


def _row_chunks(m: Model, name: str) -> Iterator[slice | None]:
    """Slices of the first axis of about VALUE_CHUNK values, whole Q/K heads each (None: the whole 1-D)."""
    shape = m.info(name).shape
    if len(shape) < 2:
        yield None
        return
    step = max(1, VALUE_CHUNK // max(1, int(np.prod(shape[1:]))))
    if _is_qk(name):  # the Q/K permutation moves rows within a head only
        step = max(1, step // m.config.head_dim) * m.config.head_dim
    for r in range(0, shape[0], step):
        yield slice(r, min(shape[0], r + step))


def _values(m: Model, name: str, rows: slice | None) -> F32:
    return m.read(name) if rows is None else m.read_rows(name, rows)
