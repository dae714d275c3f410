"""`apr bisect A B`: trace two models (or take existing traces) on the same tokens, compare every stage in
forward order, and say where they part ways and whether that stage makes the error or inherits it.

A is the reference (relative errors are ‖a−b‖/‖b‖ as in `apr diff`; KL is KL(A‖B)). Each side is a model
(any format, any engine) or a trace directory. Models are traced with every stage of every layer and
all-position logits into a work directory. Both sides take the same prompt (apr.trace.prompt): text or a
chat turn goes through each side's own tokenizer (or template), and the two must agree on the ids (or with
a trace's recorded ids): comparing different inputs element-wise means nothing. Token ids go to both
sides as they are, no tokenizer involved, so two checkpoints whose tokenizers disagree can still be
compared. A model facing a trace directory runs on the trace's recorded prompt. `isolate` re-runs each
layer of B (reference engine, B's weights) on A's captured input to that layer, so each stage's own error
can be shown next to the error it inherited.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from apr.diff.align import Side, align
from apr.diff.compare import StageDiff, Tolerance, TraceDiff, diff_traces, require_compared
from apr.diff.growth import GrowthReport, GrowthRow, ToleranceModel, analyze
from apr.diff.logits import LogitAgreement, compare_logits
from apr.diff.metrics import compare
from apr.engine.weights import Weights
from apr.errors import MismatchError, ValidationError
from apr.models.registry import stage_graph
from apr.stages import Stage, StageId
from apr.trace.layout import MANIFEST_NAME, stage_files
from apr.trace.manifest import Manifest, RunInfo
from apr.trace.plan import TracePlan
from apr.trace.prompt import Prompt, PromptSource
from apr.trace.reader import Trace, read_trace
from apr.trace.run import PreparedTrace, TraceOptions, prepare_trace

ACTIVATION_QUANT_ENGINES = frozenset({"llama.cpp"})


@dataclass(frozen=True, slots=True)
class SideSpec:
    path: Path
    engine: str = "reference"


@dataclass(frozen=True, slots=True)
class IsolatedRow:
    sid: StageId
    error: float  # B's layer on A's input, against A
    total: float  # the full-run error of the stage

    @property
    def inherited(self) -> float:
        return max(self.total - self.error, 0.0)


@dataclass
class BisectResult:
    a: SideSpec
    b: SideSpec
    manifests: tuple[Manifest | None, Manifest | None]  # how each side ran (None: an aprender trace)
    diff: TraceDiff
    growth: GrowthReport
    logits: LogitAgreement | None
    token_ids: tuple[int, ...]
    isolated: list[IsolatedRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    top1_text: tuple[list[str], list[str]] = (
        [],
        [],
    )  # each side's top-1 tokens decoded (when it has a tokenizer)


def is_trace_dir(path: Path) -> bool:
    return path.is_dir() and ((path / MANIFEST_NAME).is_file() or bool(stage_files(path)))


def _check_tokens(a: PreparedTrace | Trace, b: PreparedTrace | Trace, pa: Path, pb: Path) -> tuple[int, ...]:
    ids = [x.token_ids if isinstance(x, PreparedTrace) else _trace_ids(x) for x in (a, b)]
    if ids[0] != ids[1]:
        raise MismatchError(
            f"the two sides tokenize the prompt differently ({pa}: {list(ids[0])}, {pb}: {list(ids[1])}); "
            "stage tensors of different token sequences cannot be compared element-wise "
            "(to compare them on the same ids anyway, give the ids with --tokens)"
        )
    return ids[0]


def _trace_ids(t: Trace) -> tuple[int, ...]:
    if t.manifest is None:
        raise ValidationError(f"{t.path} has no manifest.json (not written by apr): its tokens are unknown")
    return t.manifest.run.token_ids


def _prepare_sides(
    a: SideSpec, b: SideSpec, prompt: Prompt
) -> tuple[PreparedTrace | Trace, PreparedTrace | Trace]:
    """Existing traces are read; a model runs on the prompt of the trace on the other side, if any."""
    traces = [read_trace(s.path) if is_trace_dir(s.path) else None for s in (a, b)]
    recorded = [recorded_prompt(t.manifest.run) for t in traces if t is not None and t.manifest is not None]
    model_prompt = recorded[0] if recorded else prompt
    ta, tb = traces
    return (ta or prepare_trace(a.path, model_prompt, a.engine)), (
        tb or prepare_trace(b.path, model_prompt, b.engine)
    )


def recorded_prompt(run: RunInfo) -> Prompt:
    """The prompt a trace was run on, to run a model the same way (its text, chat turn or token ids)."""
    if run.prompt_source is PromptSource.TOKENS:
        return Prompt(token_ids=run.token_ids)
    chat = run.prompt_source is PromptSource.CHAT
    file = Path(run.prompt_file) if run.prompt_file is not None else None
    return Prompt(run.prompt, file=file, chat=chat, system=run.system_prompt if chat else None)


@contextmanager
def _workdir(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="apr-bisect-") as d:
        yield Path(d)


def _materialize(x: PreparedTrace | Trace, spec: SideSpec, out: Path, opt: TraceOptions) -> Trace:
    if isinstance(x, Trace):
        return x
    n = x.model.config.n_layers
    x.run(
        TracePlan.from_cli("all", f"0..{n}"), out, TraceOptions(spec.engine, opt.precision, lm_head_all=True)
    )
    return read_trace(out)


def bisect(
    a: SideSpec,
    b: SideSpec,
    prompt: Prompt | str,
    *,
    model: ToleranceModel | None = None,
    cosine: Tolerance | None = None,
    isolate: bool = False,
    keep: Path | None = None,
    precision: str = "f32",
) -> BisectResult:
    """Compare A (reference) and B stage by stage, on the same token ids; see the module docstring."""
    pa, pb = _prepare_sides(a, b, Prompt(prompt) if isinstance(prompt, str) else prompt)
    ids = _check_tokens(pa, pb, a.path, b.path)
    if isolate and isinstance(pb, Trace):
        raise ValidationError("--isolate re-runs B's layers, so B must be a model, not a trace directory")
    opt = TraceOptions(precision=precision)
    with _workdir(keep) as work:
        ta = _materialize(pa, a, work / "a", opt)
        tb = _materialize(pb, b, work / "b", opt)
        diff = diff_traces(ta, tb, cosine)
        require_compared(diff)  # a verdict of "no divergence" needs at least one compared stage
        types = tuple(t.manifest.run.tensor_types if t.manifest else {} for t in (ta, tb))
        engines = [t.manifest.run.engine if t.manifest else "" for t in (ta, tb)]
        quantizes = (engines[0] in ACTIVATION_QUANT_ENGINES, engines[1] in ACTIVATION_QUANT_ENGINES)
        tm = replace(model or ToleranceModel(), activation_quant=quantizes)
        cfg = ta.manifest.run.config if ta.manifest else None
        growth = analyze(diff, tm, (types[0], types[1]), stage_graph(cfg))
        result = BisectResult(a, b, (ta.manifest, tb.manifest), diff, growth, _logits(ta, tb), ids)
        if result.logits is not None:
            result.top1_text = (_decode(pa, result.logits.top1_a), _decode(pb, result.logits.top1_b))
        if isolate:
            assert isinstance(pb, PreparedTrace)
            result.isolated = isolate_layers(ta, pb, diff)
    return result


def _logits(a: Trace, b: Trace) -> LogitAgreement | None:
    sid = StageId(Stage.LM_HEAD)
    if sid not in a.entries or sid not in b.entries:
        return None
    x, y = a.load(sid), b.load(sid)
    if x.shape != y.shape:  # one side kept the last position only
        x, y = x.reshape(-1, x.shape[-1])[-1:], y.reshape(-1, y.shape[-1])[-1:]
    return compare_logits(np.asarray(x), np.asarray(y))


def _decode(side: PreparedTrace | Trace, ids: list[int]) -> list[str]:
    tok = side.tokenizer if isinstance(side, PreparedTrace) else None
    return [tok.decode([i]) for i in ids] if tok is not None else []


class _Collect:
    def __init__(self) -> None:
        self.items: dict[StageId, Any] = {}

    def __call__(self, sid: StageId, value: Any, /) -> None:
        self.items[sid] = np.asarray(value)


def isolate_layers(a: Trace, b: PreparedTrace, diff: TraceDiff) -> list[IsolatedRow]:
    """Run each layer of B (reference engine) on A's input to that layer; compare with A's stages."""
    cfg, layer = b.model.config, b.model.family.layer
    w = Weights(b.model)
    total = {r.sid: r.metrics.rel_l2 for r in diff.rows}
    side_a, side_b = Side.of(a), Side(cfg.qk_layout, cfg)
    rows: list[IsolatedRow] = []
    for i in range(cfg.n_layers):
        src = StageId(Stage.POST_FFN_RESIDUAL, i - 1) if i else StageId(Stage.EMBEDDING, 0)
        if src not in a.entries:
            raise ValidationError(f"--isolate needs A's input to layer {i} ({src}), which A's trace lacks")
        x = np.asarray(a.load(src), dtype=np.float32).reshape(len(_trace_ids(a)), cfg.hidden_size)
        got = _Collect()
        layer(w, cfg, i, x, got)
        for sid, value in got.items.items():
            if sid in a.entries:
                ya, yb = align(sid, a.load(sid), side_a, value, side_b)
                rows.append(IsolatedRow(sid, compare(ya, yb).rel_l2, total.get(sid, float("nan"))))
    return rows


@dataclass(frozen=True, slots=True)
class LayerRow:
    layer: int
    output: GrowthRow | None  # the layer output (post_ffn_residual)
    worst: GrowthRow  # the stage of this layer with the largest error
    jumps: int


def layer_summary(r: BisectResult) -> list[LayerRow]:
    """One row per decoder layer: its output error, its worst stage, how many of its stages jump."""
    by_layer: dict[int, list[GrowthRow]] = {}
    for row in r.growth.rows:
        if row.diff.sid.layer is not None:
            by_layer.setdefault(row.diff.sid.layer, []).append(row)
    out = []
    for layer, rows in sorted(by_layer.items()):
        output = next((x for x in rows if x.diff.sid.stage is Stage.POST_FFN_RESIDUAL), None)
        worst = max(rows, key=lambda x: x.error)
        out.append(LayerRow(layer, output, worst, sum(x.jump for x in rows)))
    return out


def first_beyond_cosine(r: BisectResult) -> StageDiff | None:
    """aprender's rule of thumb (cosine < 0.999 by default), for information next to the growth verdict."""
    return r.diff.first_divergence
