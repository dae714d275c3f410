"""Plain-text renderings of diff results.

Pure functions: a result in, a string out, no statistics computed here.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from apr.quant.types import QUANT_LAYOUT, QuantType
from apr.report import routing
from apr.report.numfmt import rust_exp, rust_fixed, short
from apr.stages import StageId
from apr.trace.estimate import human

if TYPE_CHECKING:  # annotations only (see report/json.py)
    from apr.convert.export import ExportResult
    from apr.convert.gguf_export import GgufExportResult
    from apr.convert.importer import ImportResult
    from apr.diff.compare import StageDiff, StageFileDiff, TraceDiff
    from apr.trace.run import TraceOutcome

BOX_WIDTH: Final = 80
STALE_SHOWN: Final = 5


def _box_line(text: str) -> str:
    return "║ " + text.ljust(BOX_WIDTH - 3) + "║"


def render_stage_file_diff(d: StageFileDiff) -> str:
    """aprender's 80-column box for `apr diff --values` on two APRT files (spec §4.4)."""
    m = d.metrics
    bar = "═" * (BOX_WIDTH - 2)
    lines = [
        f"╔{bar}╗",
        _box_line("APR STAGE TENSOR DIFF (APRT, element-wise)"),
        f"╠{bar}╣",
        _box_line(f"A:           {d.path_a!s:<64}"),
        _box_line(f"B:           {d.path_b!s:<64}"),
        _box_line(f"Layer:       {'whole-model' if d.layer is None else d.layer}"),
        _box_line(f"Elements:    {m.n}"),
        _box_line(f"max|diff|:   {rust_exp(m.max_abs)} (at index {m.max_index})"),
        _box_line(f"RMS diff:    {rust_exp(m.rms)}"),
        _box_line(f"cosine sim:  {rust_fixed(m.cosine, 10)}"),
        f"╠{bar}╣",
        _box_line("Top divergences (by |a - b|):"),
    ]
    for t in d.top:
        a, b = rust_exp(t.a, sign=True), rust_exp(t.b, sign=True)
        lines.append(_box_line(f"  [{t.index:>8}] a={a:>13}  b={b:>13}  |Δ|={rust_exp(t.abs_diff)}"))
    lines.append(f"╚{bar}╝")
    return "\n".join(lines) + "\n"


_HEADER: Final = (
    f"{'':2}{'layer':>5}  {'stage':<19}{'elements':>10}  {'max|diff|':>10}  {'RMS':>10}  "
    f"{'cosine':>12}  {'rel L2':>10}  {'SQNR dB':>8}"
)


def _row(r: StageDiff, first: bool) -> str:
    m = r.metrics
    mark = ">>" if first else ("! " if not r.passed else "  ")
    layer = "-" if r.sid.layer is None else str(r.sid.layer)
    sqnr = f"{m.sqnr_db:.1f}" if math.isfinite(m.sqnr_db) else short(m.sqnr_db)
    return (
        f"{mark}{layer:>5}  {r.sid.stage.value:<19}{m.n:>10}  {short(m.max_abs):>10}  {short(m.rms):>10}  "
        f"{m.cosine:>12.9f}  {short(m.rel_l2):>10}  {sqnr:>8}"
    )


def _worst(r: StageDiff) -> str:
    m = r.metrics
    coords = r.worst_coords
    where = ", ".join(f"{k} {v}" for k, v in coords.items()) if coords else f"index {m.max_index}"
    return f"max|diff| {short(m.max_abs)} at {where} (a={m.a_at_max:.6g}, b={m.b_at_max:.6g})"


def render_trace_diff(d: TraceDiff) -> str:
    """The per-stage table of `apr diff A B --values` on two trace directories, first divergence marked."""
    first = d.first_divergence
    out = [
        f"A: {d.path_a}",
        f"B: {d.path_b}",
        f"rule: a stage diverges when {d.tolerance.describe()}",
        *routing.render_text(d.routing),
        "",
    ]
    out.append(_HEADER)
    out.extend(_row(r, r is first) for r in d.rows)
    out.append("")
    out.append(f"{len(d.rows)} stages compared, {len(d.diverged)} diverged.")
    if first is None:
        out.append("No divergence under this rule.")
    else:
        out.append(f"First divergence: {first.sid} (cosine {first.metrics.cosine:.9f}); {_worst(first)}")
    out.extend(only_in_lines(d))
    out.extend(f"note: {n}" for n in d.notes)
    return "\n".join(out) + "\n"


def only_in_lines(d: TraceDiff) -> list[str]:
    """One line per stage a side lacks: `ffn_silu at layers 0..30: only in A (why B lacks it)`, the reason
    from the other side's manifest when its engine gave one."""
    out = []
    for g in d.only_in():
        plural = "s" if len(g.layers) > 1 else ""
        where = g.stage.value + (f" at layer{plural} {_layer_ranges(list(g.layers))}" if g.layers else "")
        out.append(f"{where}: only in {g.side}" + (f" ({g.reason})" if g.reason else ""))
    return out


def render_trace_header(format_name: str, model: Path, stages: str, layers: str, out_dir: Path) -> str:
    """aprender's header block of `apr trace --save-tensor` (spec §1.5)."""
    return (
        f"=== apr trace --save-tensor ({format_name.upper()}) ===\n"
        f"Model:        {model}\n"
        f"Stages:       {stages}\n"
        f"Layers:       {layers}\n"
        f"Output dir:   {out_dir}\n\n"
    )


def render_prompt(prompt: str | None, token_ids: Sequence[int]) -> str:
    """The text the model reads (None: the token ids were given) and its ids."""
    ids = ", ".join(str(t) for t in token_ids)
    shown = "(token ids given)" if prompt is None else f'"{prompt}"'
    return f"Test prompt:  {shown}\nToken ids:    [{ids}] ({len(token_ids)} tokens)\n\n"


def render_disk_estimate(estimate: int, free: int) -> str:
    """The disk estimate printed before a trace runs (apr.trace.estimate)."""
    return f"Disk:         ~{human(estimate)} estimated ({human(free)} free)\n\n"


def _layer_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] → "0..3, 5" (START..END, END exclusive, like --save-tensor-layers)."""
    spans: list[list[int]] = []
    for i in sorted(layers):
        if spans and i == spans[-1][1]:
            spans[-1][1] = i + 1
        else:
            spans.append([i, i + 1])
    return ", ".join(f"{a}" if b == a + 1 else f"{a}..{b}" for a, b in spans)


def _group_missing(missing: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """One line per (stage, reason): "qkv_bias at layers 0..30" instead of thirty lines."""
    groups: dict[tuple[str, str], list[int]] = {}
    for text_id, why in missing:
        sid = StageId.parse(text_id)
        groups.setdefault((sid.stage.value, why), []).extend([] if sid.layer is None else [sid.layer])
    return [
        (f"{stage} at layer(s) {_layer_ranges(layers)}" if layers else stage, why)
        for (stage, why), layers in groups.items()
    ]


def render_trace_outcome(o: TraceOutcome) -> str:
    r = o.result
    out = []
    if r.removed_stale:
        out.append(f"Removed {len(r.removed_stale)} stale stage file(s) of an earlier run in {r.out_dir}:")
        out += [f"  {p}" for p in r.removed_stale[:STALE_SHOWN]]
        out += [f"  … and {len(r.removed_stale) - STALE_SHOWN} more (--json lists all)"] * (
            len(r.removed_stale) > STALE_SHOWN
        )
    if r.stats is not None:  # --save-tensor-mode stats
        st = r.stats
        out.append(f"Wrote statistics of {st.stages} stage(s), {st.records} positions:")
        out.append(f"  {st.path} ({st.bytes} bytes)")
    else:
        out.append(f"Wrote {len(r.files)} stage tensor file(s):")
        out.extend(f"  {f.path} ({f.bytes} bytes)" for f in r.files)
    if r.not_captured:
        out.append(f"Not captured ({len(r.not_captured)}):")
        out.extend(f"  {what}: {why}" for what, why in _group_missing(r.not_captured))
    if r.manifest_path is not None:
        out.append(f"Manifest:     {r.manifest_path}")
    cfg = o.run.config
    n_logits = cfg.vocab_size if o.engine.logits is None else int(o.engine.logits.size)
    out.append("")
    out.append(
        f"Forward pass succeeded — {cfg.n_layers} layer activations, {n_logits} logits "
        f"({o.run.engine} engine, {o.run.precision})"
    )
    return "\n".join(out) + "\n"


def render_import(r: ImportResult, verbose: bool = False) -> str:
    out = [f"Wrote {r.out} ({r.tensors} tensors)"]
    if r.wanted is not None:
        out.append("  " + quantize_summary(r))
    out.append(f"  {len(r.passthrough)} tensors stored byte for byte")
    if r.converted:
        kinds = Counter((a, b) for _, a, b in r.converted)
        out.append(
            f"  {len(r.converted)} tensors converted: "
            + ", ".join(f"{a}→{b} ×{n}" for (a, b), n in kinds.items())
        )
        if verbose:
            out += [f"    {name}: {a} → {b}" for name, a, b in r.converted]
    if r.tied_lm_head:
        out.append("  lm_head.weight: copied from the embedding (tied_embeddings)")
    return "\n".join(out) + "\n"


def quantize_summary(r: ImportResult) -> str:
    """`211 matrices: 181 Q8_0, 30 Q4_K (rows of 576 are not a multiple of 256)`, commonest type first."""
    types = Counter(t for _, _, t in r.matrices)
    line = f"{len(r.matrices)} matrices: " + ", ".join(f"{n} {t}" for t, n in types.most_common())
    short = sorted({cols for _, cols, t in r.matrices if t != r.wanted})
    if short and r.wanted is not None:
        block = QUANT_LAYOUT[QuantType[r.wanted]].block_size
        line += f" (rows of {', '.join(map(str, short))} are not a multiple of {block})"
    return line


def render_export(r: ExportResult) -> str:
    out = [f"Wrote {r.out_dir} ({r.tensors} tensors)"]
    out += [f"  {f.name}" for f in r.files]
    if r.permuted:
        out.append(f"  {len(r.permuted)} Q/K tensors put back in Hugging Face row order")
    out += [f"  note: {n}" for n in r.notes]
    return "\n".join(out) + "\n"


def render_gguf_export(r: GgufExportResult) -> str:
    types = Counter(r.types.values())
    out = [f"Wrote {r.out} ({r.tensors} tensors, architecture {r.architecture})"]
    out.append("  types: " + ", ".join(f"{n} {t}" for t, n in types.most_common()))
    if r.copied:
        out.append(f"  {len(r.copied)} tensors copied byte for byte")
    if r.fallback:
        kinds = Counter((a, b) for _, a, b in r.fallback)
        out += [
            f"  {n} tensors {b} instead of {a} (rows are not whole {a} blocks)" for (a, b), n in kinds.items()
        ]
    if r.permuted:
        out.append(f"  {len(r.permuted)} Q/K tensors put in GGUF (interleaved) row order")
    out += [f"  note: {n}" for n in r.notes]
    return "\n".join(out) + "\n"
