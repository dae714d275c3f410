"""`apr bisect A B`: trace two models (or take existing traces) on the same tokens, compare every stage in
forward order, and say where they part ways and whether that stage makes the error or inherits it.

A is the reference (relative errors are ‖a−b‖/‖b‖ as in `apr diff`; KL is KL(A‖B)). Each side is a model
(any format, any engine) or a trace directory. Models are traced with every stage of every layer and
all-position logits into a work directory. Both sides take the same prompt (apr.trace.prompt): text or a
chat turn goes through each side's own tokenizer (or template), and the two must agree on the ids (or with
a trace's recorded ids): comparing different inputs element-wise means nothing. Token ids go to both
sides as they are, no tokenizer involved, so two checkpoints whose tokenizers disagree can still be
compared. A model facing a trace directory runs on the trace's recorded prompt. `isolate` re-runs each
layer of B (in B's own engine: diff/isolate.py) on A's captured input to that layer, so each stage's own error
can be shown next to the error it inherited.

Long prompts run in two phases (`phases`, docs/stats.md): phase 1 traces both sides in statistics mode
(apr.trace.stats: every stage, layer and position, 96 bytes a position) and runs the growth rule on the
statistics bounds (apr.diff.stats: lower bounds of each stage's error); phase 2 traces in full only the
layer before the first suspicious stage through it, at PHASE2_POSITIONS positions, and the verdict is made
there, so disk and memory stay bounded whatever the prompt's length. Short prompts keep the one phase.
Each side's precision is its own (`precisions`): `ggml` on A against llama.cpp on B shrinks the budgets of
the weight types the emulation reproduces (apr.diff.growth.EMULATED_TYPES).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import numpy as np

from apr.diff.compare import Tolerance, TraceDiff, diff_traces, require_compared
from apr.diff.growth import GrowthReport, ToleranceModel, analyze, classify
from apr.diff.isolate import IsolatedRow, check_isolate, isolate_layers
from apr.diff.logits import LogitAgreement, compare_logits
from apr.diff.stats import StatsDiff, diff_stats, stats_errors
from apr.errors import MismatchError, ValidationError
from apr.models.config import ModelConfig
from apr.models.registry import stage_graph
from apr.stages import Stage, StageId
from apr.trace.estimate import human
from apr.trace.layout import MANIFEST_NAME, stage_files
from apr.trace.manifest import Manifest, RunInfo
from apr.trace.plan import TracePlan
from apr.trace.prompt import Prompt, PromptSource
from apr.trace.reader import Trace, read_trace
from apr.trace.run import PRECISION_GGML, PreparedTrace, TraceOptions, prepare_trace
from apr.trace.stats import MODE_STATS

ACTIVATION_QUANT_ENGINES = frozenset({"llama.cpp"})


@dataclass(frozen=True, slots=True)
class SideSpec:
    path: Path
    engine: str = "reference"


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
    phases: PhaseInfo | None = None  # two-phase bisect: what the statistics phase found (None: one phase)
    notes: list[str] = field(default_factory=list)
    top1_text: tuple[list[str], list[str]] = (
        [],
        [],
    )  # each side's top-1 tokens decoded (when it has a tokenizer)
    top_k_text: tuple[list[str], list[str]] = ([], [])  # each side's top-k at the last position, decoded


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


ProgressFactory = Callable[[str, int], Callable[[int], None]]  # (label, layers) → on_layer(i)
PHASES: Final = ("auto", "1", "2")
# `--phases auto`: one phase (every stage of every layer in full, as before) while the two full traces are
# estimated to write at most this together; above it, two phases (statistics, then a window in full)
ONE_PHASE_MAX_BYTES: Final = 256 << 20
# phase 2 keeps this many prompt positions (the (heads, query, key) stages as [heads, 128, T]), centred on
# where phase 1 saw the suspicious stage differ most: its disk stays bounded whatever the prompt's length
PHASE2_POSITIONS: Final = 128


@dataclass(frozen=True, slots=True)
class SideRun:
    """How one side is traced: its engine and precision, and who hears of its progress."""

    spec: SideSpec
    precision: str = "f32"
    label: str = "A"


@dataclass(frozen=True, slots=True)
class PhaseInfo:
    """Two-phase bisect: what phase 1 found and what phase 2 traced in full."""

    stats: StatsDiff  # phase 1: every stage of every layer, compared by per-position statistics
    suspicious: StageId | None  # the first stage phase 1's growth rule flags (None: none jumps)
    chosen_by: str  # "first statistics jump", "largest statistics growth", "last layer"
    layers: range  # phase 2: the decoder layers traced in full
    positions: range  # phase 2: the prompt positions kept (around the suspicious stage's worst one)
    disk: tuple[int, int]  # bytes on disk: phase 1 (both stats traces), phase 2 (both full traces)


def _materialize(
    x: PreparedTrace | Trace,
    side: SideRun,
    out: Path,
    plan: TracePlan | None = None,
    *,
    lm_head_all: bool = True,
    progress: ProgressFactory | None = None,
    phase: str = "",
) -> Trace:
    if isinstance(x, Trace):
        if x.stats is not None:
            raise ValidationError(
                f"{x.path} is a --save-tensor-mode stats trace: bisect needs stage files (compare "
                "statistics with `apr diff`)"
            )
        return x
    n = x.model.config.n_layers
    plan = plan or TracePlan.from_cli("all", f"0..{n}")
    on_layer = progress(f"{phase}{side.label} layer", n) if progress is not None else None
    opt = TraceOptions(side.spec.engine, side.precision, lm_head_all=lm_head_all, on_layer=on_layer)
    x.run(plan, out, opt)
    return read_trace(out)


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _tolerance(ta: Trace, tb: Trace, model: ToleranceModel | None) -> ToleranceModel:
    """The budgets from how the two sides ran (their manifests): who quantizes activations, who emulates."""
    runs = [t.manifest.run if t.manifest else None for t in (ta, tb)]
    quantizes = tuple(r is not None and r.engine in ACTIVATION_QUANT_ENGINES for r in runs)
    emulates = tuple(
        r is not None and r.engine == "reference" and r.precision == PRECISION_GGML for r in runs
    )
    return replace(
        model or ToleranceModel(),
        activation_quant=(quantizes[0], quantizes[1]),
        emulates_ggml=(emulates[0], emulates[1]),
    )


def _types(ta: Trace, tb: Trace) -> tuple[dict[str, str], dict[str, str]]:
    return (
        ta.manifest.run.tensor_types if ta.manifest else {},
        tb.manifest.run.tensor_types if tb.manifest else {},
    )


def two_phase_wanted(phases: str, pa: PreparedTrace | Trace, pb: PreparedTrace | Trace, work: Path) -> bool:
    """`--phases`: 1, 2, or auto (two when the full traces would exceed ONE_PHASE_MAX_BYTES together)."""
    if phases not in PHASES:
        raise ValidationError(f"--phases {phases!r}: choose from {', '.join(PHASES)}")
    if phases == "1" or not (isinstance(pa, PreparedTrace) and isinstance(pb, PreparedTrace)):
        if phases == "2":
            raise ValidationError("--phases 2 traces both sides twice, so both must be models, not traces")
        return False
    if phases == "2":
        return True
    n = pa.model.config.n_layers
    plan = TracePlan.from_cli("all", f"0..{n}")
    full = TraceOptions(lm_head_all=True)
    total = sum(p.estimate_disk(plan, work / "x", full).bytes for p in (pa, pb))
    return total > ONE_PHASE_MAX_BYTES


def _suspect(
    sd: StatsDiff, tm: ToleranceModel, types: tuple[dict[str, str], dict[str, str]], cfg: ModelConfig | None
) -> tuple[StageId | None, str, dict[StageId, float]]:
    """Phase 1's verdict: the growth rule on the statistics bounds (each ≤ the stage's per-position error).
    The first stage that jumps; else the one closest to jumping (largest error / allowed)."""
    errors = stats_errors(sd)
    judged = classify(errors, tm, types, stage_graph(cfg))
    ordered = sorted(errors, key=lambda s: s.sort_key)
    first = next((sid for sid in ordered if judged[sid][4]), None)
    if first is not None:
        return first, "first statistics jump", errors
    ratios = {sid: judged[sid][0] / judged[sid][3] for sid in ordered if judged[sid][0] > 0}
    if ratios:
        return max(ratios, key=lambda s: ratios[s]), "largest statistics growth", errors
    return None, "last layer", errors


def _window(sid: StageId | None, n_layers: int) -> range:
    """The layer before the suspicious stage's through it (the last layer for a whole-model stage)."""
    layer = n_layers - 1 if sid is None or sid.layer is None else sid.layer
    return range(max(layer - 1, 0), layer + 1)


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
    precisions: tuple[str | None, str | None] = (None, None),
    phases: str = "auto",
    progress: ProgressFactory | None = None,
) -> BisectResult:
    """Compare A (reference) and B stage by stage, on the same token ids; see the module docstring.

    `precisions`: each side's --precision (None: `precision`). `phases`: "1" traces every stage of every
    layer in full; "2" first compares both sides by per-position statistics (every layer, every position,
    --save-tensor-mode stats) and then traces in full only the layer before the first suspicious stage
    through it (whole-model stages always), where the growth analysis runs; "auto" (default) is "1" while
    the two full traces would write ≤ ONE_PHASE_MAX_BYTES, and always with `isolate` (it needs A's input to
    every layer) or an existing trace directory on either side. `progress(label, layers)` hears of each
    side's layers ("phase 1/2 stats: A layer", …)."""
    pa, pb = _prepare_sides(a, b, Prompt(prompt) if isinstance(prompt, str) else prompt)
    ids = _check_tokens(pa, pb, a.path, b.path)
    if isolate:
        check_isolate(pb, b.engine)  # diff/isolate.py: B a model, in an engine that can run one layer
    sides = SideRun(a, precisions[0] or precision, "A"), SideRun(b, precisions[1] or precision, "B")
    with _workdir(keep) as work:
        two = two_phase_wanted("1" if isolate and phases == "auto" else phases, pa, pb, work)
        if isolate and two:
            raise ValidationError("--isolate needs every layer of A in full: use it with --phases 1")
        phase: PhaseInfo | None = None
        if two:
            assert isinstance(pa, PreparedTrace) and isinstance(pb, PreparedTrace)
            phase, ta, tb, prior = _two_phase(pa, pb, sides, work, model, cosine, progress)
        else:
            ta = _materialize(pa, sides[0], work / "a", progress=progress)
            tb = _materialize(pb, sides[1], work / "b", progress=progress)
            prior = {}
        diff = diff_traces(ta, tb, cosine)
        require_compared(diff)  # a verdict of "no divergence" needs at least one compared stage
        tm = _tolerance(ta, tb, model)
        cfg = ta.manifest.run.config if ta.manifest else None
        growth = analyze(diff, tm, _types(ta, tb), stage_graph(cfg), prior)
        result = BisectResult(a, b, (ta.manifest, tb.manifest), diff, growth, _logits(ta, tb), ids)
        result.phases = phase
        if phase is not None:
            result.notes.append(_phase_note(phase, len(ids)))
        if result.logits is not None:
            result.top1_text = (_decode(pa, result.logits.top1_a), _decode(pb, result.logits.top1_b))
            result.top_k_text = (_decode(pa, result.logits.top_k_a), _decode(pb, result.logits.top_k_b))
        if isolate:
            assert isinstance(pb, PreparedTrace)
            result.isolated = isolate_layers(ta, pb, diff, b.engine)
    return result


def _two_phase(
    pa: PreparedTrace,
    pb: PreparedTrace,
    sides: tuple[SideRun, SideRun],
    work: Path,
    model: ToleranceModel | None,
    cosine: Tolerance | None,
    progress: ProgressFactory | None,
) -> tuple[PhaseInfo, Trace, Trace, dict[StageId, float]]:
    n = pa.model.config.n_layers
    stats_plan = TracePlan.from_cli("all", f"0..{n}", mode=MODE_STATS)
    one: dict[str, Any] = {"progress": progress, "phase": "phase 1/2 stats: "}
    sa = _materialize(pa, sides[0], work / "a-stats", stats_plan, **one)
    sb = _materialize(pb, sides[1], work / "b-stats", stats_plan, **one)
    sd = diff_stats(sa, sb, cosine)
    tm = _tolerance(sa, sb, model)
    suspect, why, errors = _suspect(sd, tm, _types(sa, sb), pa.model.config)
    layers = _window(suspect, n)
    whole = suspect is not None and suspect.layer is None
    rows = _positions(sd, suspect, len(pa.token_ids))
    plan = TracePlan.from_cli("all", f"{layers.start}..{layers.stop}", f"{rows.start}..{rows.stop}")
    label = f"phase 2/2 full, layers {layers.start}..{layers.stop}: "
    kw: dict[str, Any] = {"lm_head_all": whole, "progress": progress, "phase": label}
    ta = _materialize(pa, sides[0], work / "a", plan, **kw)
    tb = _materialize(pb, sides[1], work / "b", plan, **kw)
    disk = (_du(work / "a-stats") + _du(work / "b-stats"), _du(work / "a") + _du(work / "b"))
    prior = {sid: e for sid, e in errors.items() if sid not in ta.entries}
    return PhaseInfo(sd, suspect, why, layers, rows, disk), ta, tb, prior


def _positions(sd: StatsDiff, suspect: StageId | None, n_tokens: int) -> range:
    """Phase 2's prompt positions: PHASE2_POSITIONS of them around the suspicious stage's worst position."""
    if n_tokens <= PHASE2_POSITIONS:
        return range(n_tokens)
    row = next((r for r in sd.rows if r.sid == suspect), None)
    worst = n_tokens - 1 if row is None else row.worst_position
    lo = min(max(worst - PHASE2_POSITIONS // 2, 0), n_tokens - PHASE2_POSITIONS)
    return range(lo, lo + PHASE2_POSITIONS)


def _phase_note(p: PhaseInfo, n_tokens: int) -> str:
    where = "no stage" if p.suspicious is None else str(p.suspicious)
    return (
        f"two-phase bisect ({n_tokens} tokens): phase 1 compared {len(p.stats.rows)} stages by per-position "
        f"statistics ({human(p.disk[0])}); {p.chosen_by}: {where}; phase 2 traced layers "
        f"{p.layers.start}..{p.layers.stop} at positions {p.positions.start}..{p.positions.stop} in full "
        f"({human(p.disk[1])}); the verdict is on those stages"
    )


def _logits(a: Trace, b: Trace) -> LogitAgreement | None:
    sid = StageId(Stage.LM_HEAD)
    if sid not in a.entries or sid not in b.entries:
        return None
    x, y = a.load(sid), b.load(sid)
    if x.shape != y.shape:  # one side kept the last position only
        x, y = x.reshape(-1, x.shape[-1])[-1:], y.reshape(-1, y.shape[-1])[-1:]
    return compare_logits(np.asarray(x), np.asarray(y))


def _decode(side: PreparedTrace | Trace, ids: list[int]) -> list[str]:
    tok = side.decoder() if isinstance(side, PreparedTrace) else None
    return [tok.decode([i]) for i in ids] if tok is not None else []
