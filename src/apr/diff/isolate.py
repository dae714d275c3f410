"""`apr bisect --isolate`: each layer of B re-run on A's captured input to that layer, in B's OWN engine, so a
stage's own error (what B's layer does to a correct input) is told apart from the error it inherits.

- reference: the family's one-layer function (`Family.layer`) on B's weights;
- transformers: the model's own decoder-layer module, called by the model's own forward with the input
  swapped in (runtimes/transformers_layer.py), its stages tapped by the transformers runtime's hooks;
- llama.cpp: refused — llama.cpp runs a graph from token ids and cannot be handed a hidden state, and
  re-running B's layer in another engine would label that engine's error "inherited".

The own error is ‖a − b_isolated‖/‖b_isolated‖ against A's stage (Q/K layouts aligned as in any diff);
the inherited part is the full-run error minus it (never below 0).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from apr.diff.align import Side, align
from apr.diff.compare import TraceDiff
from apr.diff.metrics import compare
from apr.engine.weights import Weights
from apr.errors import ValidationError
from apr.formats.config import QKLayout
from apr.runtimes.base import ENGINE_LLAMACPP, ENGINE_TRANSFORMERS
from apr.runtimes.transformers_layer import transformers_layers
from apr.stages import Stage, StageId, Tap
from apr.trace.reader import Trace
from apr.trace.run import PreparedTrace

ENGINE_REFERENCE: Final = "reference"
REFUSED: Final[dict[str, str]] = {
    ENGINE_LLAMACPP: "llama.cpp runs its graph from token ids and cannot be fed a hidden state",
}

RunLayers = Callable[[Mapping[int, Any], Tap], object]  # {layer: its input (S, D)}, tap of their stages


@dataclass(frozen=True, slots=True)
class IsolatedRow:
    sid: StageId
    error: float  # B's layer on A's input, against A
    total: float  # the full-run error of the stage
    engine: str = ENGINE_REFERENCE  # who ran B's layer (B's own engine)

    @property
    def inherited(self) -> float:
        return max(self.total - self.error, 0.0)


def check_isolate(b: PreparedTrace | Trace, engine: str) -> None:
    """Refuse, before anything runs, an isolate B's engine cannot do (one-line ValidationError, exit 5)."""
    if isinstance(b, Trace):
        raise ValidationError("--isolate re-runs B's layers, so B must be a model, not a trace directory")
    if engine in REFUSED:
        raise ValidationError(
            f"--isolate cannot re-run B's layers in {engine}: {REFUSED[engine]} (isolate with --engine-b "
            f"{ENGINE_REFERENCE} or {ENGINE_TRANSFORMERS})"
        )


@contextlib.contextmanager
def _layers(b: PreparedTrace, engine: str) -> Iterator[RunLayers]:
    """B's engine as `run(inputs, tap)`: each given layer on its given input."""
    if engine == ENGINE_TRANSFORMERS:  # one forward pass for all of them (runtimes/transformers_layer.py)
        with transformers_layers(b.path, b.token_ids, hooks=b.model.family.hooks) as runner:
            yield runner.layers
        return
    cfg, layer, w = b.model.config, b.model.family.layer, Weights(b.model)

    def run(inputs: Mapping[int, Any], tap: Tap) -> None:
        for i, x in inputs.items():
            layer(w, cfg, i, x, tap)

    yield run


def _input(a: Trace, i: int, shape: tuple[int, int]) -> Any:
    src = StageId(Stage.POST_FFN_RESIDUAL, i - 1) if i else StageId(Stage.EMBEDDING, 0)
    if src not in a.entries:
        raise ValidationError(f"--isolate needs A's input to layer {i} ({src}), which A's trace lacks")
    x = np.asarray(a.load(src), dtype=np.float32)
    if x.size != shape[0] * shape[1]:
        raise ValidationError(f"--isolate needs A's {src} at every position; A's trace holds {x.size} values")
    return x.reshape(shape)


def isolate_layers(
    a: Trace, b: PreparedTrace, diff: TraceDiff, engine: str = ENGINE_REFERENCE
) -> list[IsolatedRow]:
    """Run each layer of B in `engine` on A's input to that layer; compare its stages with A's."""
    check_isolate(b, engine)
    cfg = b.model.config
    total = {r.sid: r.metrics.rel_l2 for r in diff.rows}
    # transformers captures Q/K in HF row order whatever the file; the reference engine in the file's
    side_a, side_b = Side.of(a), Side(QKLayout.HF if engine == ENGINE_TRANSFORMERS else cfg.qk_layout, cfg)
    rows: list[IsolatedRow] = []

    def against_a(sid: StageId, value: Any, /) -> None:  # compared as they come: nothing kept but the row
        if sid in a.entries:
            ya, yb = align(sid, a.load(sid), side_a, np.asarray(value), side_b)
            rows.append(IsolatedRow(sid, compare(ya, yb).rel_l2, total.get(sid, float("nan")), engine))

    inputs = {i: _input(a, i, (len(b.token_ids), cfg.hidden_size)) for i in range(cfg.n_layers)}
    with _layers(b, engine) as run:
        run(inputs, against_a)
    return rows


@dataclass(frozen=True, slots=True)
class IsolatedLayer:
    layer: int
    output: IsolatedRow | None  # the layer output (post_ffn_residual)
    worst: IsolatedRow  # the stage of this layer whose own error is largest


def isolate_summary(rows: list[IsolatedRow]) -> list[IsolatedLayer]:
    """One row per re-run layer: its output's own / inherited error and its stage of largest own error."""
    by_layer: dict[int, list[IsolatedRow]] = {}
    for row in rows:
        if row.sid.layer is not None:
            by_layer.setdefault(row.sid.layer, []).append(row)
    return [
        IsolatedLayer(
            layer,
            next((x for x in xs if x.sid.stage is Stage.POST_FFN_RESIDUAL), None),
            max(xs, key=lambda x: x.error if x.error == x.error else float("inf")),
        )
        for layer, xs in sorted(by_layer.items())
    ]
