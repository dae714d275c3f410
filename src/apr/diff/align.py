"""Put two traces' stage tensors into one comparable form before any metric is computed.

- Q/K layout: a stage captured in GGUF-interleaved order (llama.cpp's NORM RoPE) is permuted to HF order when
  the other side is HF (manifests say which). For qkv_matmul / qkv_bias only the Q and K segments move.
- lm_head: a last-position trace (vocab,) is compared with the last row of an all-position trace (S, vocab).
- Sizes are checked; what cannot be aligned raises MismatchError naming the stage and both shapes.
Without manifests (aprender's traces) nothing is known about layouts, and only equal sizes are compared.

Two stage files (`apr diff run-a/layer-0/q_post_rope.bin run-b/layer-0/q_post_rope.bin`) are compared
the same way: `drilldown` finds each file's trace (the nearest parent directory whose manifest.json lists
it) and the pair goes through `load_aligned` like a row of a directory diff. When the stage is
layout-sensitive (QK_STAGES) and a side's layout is unknown (no manifest lists the file), there is no
number to give: `LayoutUnknownError` (exit 5) says so instead of a cosine of two row orders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from apr.errors import MismatchError, ValidationError
from apr.formats.config import QKLayout, interleaved_to_hf
from apr.models.config import ModelConfig
from apr.stages import Stage, StageId
from apr.trace.layout import MANIFEST_NAME, stage_id_for
from apr.trace.manifest import QK_STAGES
from apr.trace.reader import Trace, read_trace

F32 = npt.NDArray[np.float32]


def _to_hf(stage: Stage, x: F32, cfg: ModelConfig) -> F32:
    flat = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)
    if stage is Stage.Q_POST_ROPE:
        out = interleaved_to_hf(flat, cfg.n_heads)
    elif stage is Stage.K_POST_ROPE:
        out = interleaved_to_hf(flat, cfg.n_kv_heads)
    else:  # [Q | K | V] per position
        q, kv = cfg.q_dim, cfg.kv_dim
        out = np.concatenate(
            [
                interleaved_to_hf(flat[:, :q], cfg.n_heads),
                interleaved_to_hf(flat[:, q : q + kv], cfg.n_kv_heads),
                flat[:, q + kv :],
            ],
            axis=1,
        )
    return out.reshape(x.shape)


_LAYOUT_FIXES: Final[dict[Stage, Callable[[Stage, F32, ModelConfig], F32]]] = {s: _to_hf for s in QK_STAGES}


@dataclass(frozen=True, slots=True)
class Side:
    """What is known about one side's tensors: its Q/K layout and config (None for aprender traces)."""

    layout: QKLayout | None = None
    config: ModelConfig | None = None

    @classmethod
    def of(cls, t: Trace) -> Side:
        return cls(t.manifest.run.qk_layout, t.manifest.run.config) if t.manifest else cls()


def align(
    sid: StageId, x: F32, sx: Side, y: F32, sy: Side, where: tuple[object, object] = ("A", "B")
) -> tuple[F32, F32]:
    """Both sides of one stage in the same layout and shape, flattened."""
    if sx.layout != sy.layout and sx.layout and sy.layout and sid.stage in _LAYOUT_FIXES:
        if sx.layout is QKLayout.INTERLEAVED and sx.config is not None:
            x = _LAYOUT_FIXES[sid.stage](sid.stage, x, sx.config)
        elif sy.config is not None:
            y = _LAYOUT_FIXES[sid.stage](sid.stage, y, sy.config)
    if sid.stage is Stage.LM_HEAD and x.size != y.size:
        x, y = _last_position(x, y)
    if x.size != y.size:
        raise MismatchError(
            f"{sid}: cannot align {where[0]} ({_shape(x)}) with {where[1]} ({_shape(y)}): "
            "different sizes (different prompts or models?)"
        )
    return x.reshape(-1), y.reshape(-1)


def needs_alignment(a: Trace, b: Trace, sid: StageId) -> bool:
    """Whether `align` could change anything for this stage (else both files compare as stored)."""
    sx, sy = Side.of(a), Side.of(b)
    relayout = sx.layout != sy.layout and sx.layout and sy.layout and sid.stage in _LAYOUT_FIXES
    return bool(relayout) or a.entries[sid].header.count != b.entries[sid].header.count


def load_aligned(a: Trace, b: Trace, sid: StageId) -> tuple[F32, F32]:
    """Both sides of one stage of two traces, aligned (see `align`)."""
    return align(sid, a.load(sid), Side.of(a), b.load(sid), Side.of(b), (a.path, b.path))


class LayoutUnknownError(ValidationError):
    """A Q/K-layout-sensitive stage file without a manifest that says its row order."""


@dataclass(frozen=True, slots=True)
class Placed:
    """Where a stage file sits: the stage its place names, and the apr trace that lists it (if any)."""

    sid: StageId
    trace: Trace | None  # None: no manifest.json above the file lists it (an aprender trace, a copy)


def place(path: Path) -> Placed | None:
    """The stage a file stands for (`layer-N/<stage>.bin` or `<stage>.bin`), or None for any other name."""
    path = path.absolute()
    sid = next(
        (s for root in path.parents[:2] if (s := stage_id_for(path.relative_to(root))) is not None), None
    )
    if sid is None:
        return None
    for root in path.parents:  # up to the trace root: the first folder with a manifest
        if (root / MANIFEST_NAME).is_file():
            trace = read_trace(root, stages={sid})  # only this stage's file is checked
            entry = trace.entries.get(sid)
            listed = entry is not None and entry.path.resolve() == path.resolve()
            return Placed(sid, trace if listed else None)
    return Placed(sid, None)


def drilldown(path_a: Path, path_b: Path) -> tuple[Trace, Trace, StageId] | None:
    """The two traces in which to compare one stage file pair as directory mode does (`load_aligned`), or
    None when the pair compares as stored (not stage files, or no manifest and nothing layout-sensitive).

    Raises LayoutUnknownError for a Q/K stage whose row order a side's missing manifest leaves unknown.
    """
    pa, pb = place(path_a), place(path_b)
    if pa and pb and pa.trace and pb.trace and pa.sid == pb.sid:
        return pa.trace, pb.trace, pa.sid
    sensitive = [p.sid for p in (pa, pb) if p is not None and p.sid.stage in _LAYOUT_FIXES]
    if not sensitive:
        return None
    unknown = [str(path) for path, p in ((path_a, pa), (path_b, pb)) if p is None or p.trace is None]
    if not unknown:
        raise MismatchError(f"{path_a} is {pa and pa.sid}, {path_b} is {pb and pb.sid}: different stages")
    raise LayoutUnknownError(
        f"{sensitive[0].stage} depends on the Q/K row layout, which is unknown for {' and '.join(unknown)} "
        "(no manifest.json lists it): refusing a number that may compare two row orders; "
        "compare files of traces written by `apr trace`"
    )


def _shape(x: F32) -> str:
    return "×".join(str(d) for d in x.shape) + f" = {x.size} values"


def _last_position(x: F32, y: F32) -> tuple[F32, F32]:
    if x.ndim == 2 and y.ndim == 1 and x.shape[1] == y.size:
        return x[-1], y
    if y.ndim == 2 and x.ndim == 1 and y.shape[1] == x.size:
        return x, y[-1]
    return x, y
