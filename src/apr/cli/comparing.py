"""Commands that compare: `diff` (traces, stage files, models) and `bisect` (where two runs part ways)."""

from __future__ import annotations

from pathlib import Path
from typing import Final

import click

from apr.atomicfile import check_writable_path, write_bytes_atomic
from apr.cli.app import (
    COSINE,
    NON_NEGATIVE,
    POSITIVE,
    FileOutput,
    Progress,
    cli,
    emit,
    exit_diverged,
    given_options,
    path_arg,
    path_type,
    show,
    wants_json,
)
from apr.cli.tracing import ENGINE_CHOICE, prompt_options
from apr.diff.bisect import PHASES, SideSpec, is_trace_dir
from apr.diff.bisect import bisect as run_bisect
from apr.diff.compare import Tolerance, diff_stage_files, diff_traces, require_compared
from apr.diff.growth import ToleranceModel
from apr.diff.models import diff_models, is_model
from apr.diff.stats import diff_stats
from apr.errors import MismatchError, NotFoundError
from apr.models import open_model
from apr.report import bisect as bisect_report
from apr.report import html as html_report
from apr.report import json as jsonr
from apr.report import model_diff as model_diff_report
from apr.report import stats_diff as stats_diff_report
from apr.report import text
from apr.trace.prompt import Prompt
from apr.trace.reader import is_stats_dir, read_trace
from apr.trace.run import PRECISIONS


@cli.command()
@path_arg("a")
@path_arg("b")
@click.option(
    "--values", is_flag=True, help="Accepted for aprender compatibility: values are always compared."
)
@click.option(
    "--limit",
    default=10,
    show_default=True,
    type=click.IntRange(min=0),
    help="Top-N element differences shown for two stage files.",
)
@click.option(
    "--min-cos", type=COSINE, help="A stage diverges when its cosine is below this (default rule: 0.999)."
)
@click.option("--max-rel", type=NON_NEGATIVE, help="A stage diverges when ‖a−b‖/‖b‖ exceeds this.")
@click.option(
    "--check",
    is_flag=True,
    help="Exit 1 when any compared stage diverges or MoE routing differs (an error when no stage could be "
    "compared).",
)
@click.option(
    "--no-data",
    is_flag=True,
    help="Two models: compare names, shapes and types only, not the tensors' data (by default both files "
    "are read in full).",
)
def diff(
    a: Path,
    b: Path,
    values: bool,
    limit: int,
    min_cos: float | None,
    max_rel: float | None,
    check: bool,
    no_data: bool,
) -> None:
    """Compare two models, two trace directories or two stage files (APRT).

    \b
    Two models (any formats): config, tokenizer (and how both encode a set of probe texts), tensor
    set and tensor data, before any forward pass (--check: exit 1 when they differ in more than
    storage and types; what could not be compared, such as the data of tensors of different types,
    is named in the verdict and does not fail it).
    Two directories: one row per common stage in forward order, first divergence marked.
    Two files: aprender's max|diff|, RMS, cosine and top-N report, element by element; stage
    files of apr traces are aligned (Q/K layout, positions) as in directory mode, and a Q/K
    stage whose layout no manifest gives is refused (exit 5).
    Example:  apr diff run-a/ run-b/ --values --check --min-cos 0.9999
              apr diff model.gguf model-hf/
    """
    tolerance = Tolerance.from_options(min_cos, max_rel)
    if missing := next((p for p in (a, b) if not (p.exists() or p.is_symlink())), None):
        raise NotFoundError(f"File not found: {missing}")  # before any side is read as what it is not
    if is_model(a) and is_model(b):  # one model against a trace: the trace checks below say what it is
        on = lambda label, n: Progress(n, label)  # noqa: E731
        found = diff_models(open_model(a), open_model(b), data=not no_data, progress=on)
        show(found, model_diff_report.to_doc, model_diff_report.render_text)
        if check and found.differs:
            exit_diverged()
        return
    if a.is_dir() != b.is_dir() and a.exists() and b.exists():
        kinds = ("directory" if a.is_dir() else "file", "directory" if b.is_dir() else "file")
        raise MismatchError(f"cannot compare a {kinds[0]} ({a}) with a {kinds[1]} ({b})")
    if a.is_dir() and _stats_diff(a, b, tolerance, check):
        return
    if a.is_dir():
        result = diff_traces(read_trace(a), read_trace(b), tolerance)
        if check:
            require_compared(result)
        show(result, jsonr.trace_diff_doc, text.render_trace_diff)
        if check and (result.diverged or result.routing_changed):
            exit_diverged()
        return
    single = diff_stage_files(a, b, limit)
    show(single, jsonr.stage_file_diff_doc, text.render_stage_file_diff)
    if check and not tolerance.passes(single.metrics):
        exit_diverged()


def _stats_diff(a: Path, b: Path, tolerance: Tolerance, check: bool) -> bool:
    """`apr diff` when a side is a `--save-tensor-mode stats` trace (apr.diff.stats); False otherwise."""
    if not (is_stats_dir(a) or is_stats_dir(b)):
        return False
    found = diff_stats(read_trace(a), read_trace(b), tolerance)
    show(found, stats_diff_report.to_doc, stats_diff_report.render_text)
    if check and found.diverged:
        exit_diverged()
    return True


@cli.command("bisect")
@path_arg("a")
@path_arg("b")
@prompt_options("both sides")
@click.option("--engine-a", type=ENGINE_CHOICE, default="reference", show_default=True, help="Who runs A.")
@click.option("--engine-b", type=ENGINE_CHOICE, default="reference", show_default=True, help="Who runs B.")
@click.option(
    "--isolate",
    is_flag=True,
    help="Re-run each layer of B, in B's own engine (reference or transformers; llama.cpp cannot take a "
    "hidden state and is refused), on A's input to it: own vs inherited error.",
)
@click.option(
    "--growth",
    type=POSITIVE,
    default=8.0,
    show_default=True,
    help="Error growth a stage may show over its inputs before it counts as a jump.",
)
@click.option(
    "--floor", type=NON_NEGATIVE, default=1e-4, show_default=True, help="Relative error any stage may add."
)
@click.option(
    "--report",
    "report_path",
    type=FileOutput(),
    help="Also write a self-contained HTML report with per-layer charts.",
)
@click.option(
    "--keep", type=path_type(), help="Keep the two traces in this directory (default: a temporary one)."
)
@click.option(
    "--precision-a",
    type=click.Choice(list(PRECISIONS)),
    default="f32",
    show_default=True,
    help="A's compute precision (ggml: the reference engine as ggml-cpu computes quantized matmuls; "
    "against --engine-b llama.cpp it shrinks the activation-quantization budget).",
)
@click.option(
    "--precision-b", type=click.Choice(list(PRECISIONS)), default="f32", show_default=True, help="B's."
)
@click.option(
    "--phases",
    type=click.Choice(list(PHASES)),
    default="auto",
    show_default=True,
    help="1: trace every stage in full; 2: compare per-position statistics of every layer first, then "
    "trace in full only the layer before the first suspicious stage through it; auto: 2 when the full "
    "traces would exceed 256 MiB together (1 with --isolate or a trace directory).",
)
@click.option(
    "--progress",
    is_flag=True,
    help="Report the phase and each side's `layer N/L` on stderr also when it is not a terminal (-q: never).",
)
def bisect_cmd(
    a: Path,
    b: Path,
    prompt: Prompt,
    engine_a: str,
    engine_b: str,
    isolate: bool,
    growth: float,
    floor: float,
    report_path: Path | None,
    keep: Path | None,
    precision_a: str,
    precision_b: str,
    phases: str,
    progress: bool,
) -> None:
    """Find the first stage where B parts ways with A (models in any format, or trace directories).

    \b
    Both sides run on the same token ids (their tokenizers must agree on the prompt; --tokens gives
    both the ids, no tokenizer involved); each stage's relative error is compared with the error its
    inputs already carry: a stage that adds more than growth × input error + its weights' expected
    quantization error is the first divergence. MoE traces: positions that select different experts
    are reported first. Exit 1 when either is found, 0 when none.
    Long prompts run in two phases (--phases): per-position statistics of every layer first, then
    the layers around the first suspicious stage in full, at 128 positions, where the verdict is made.
    Example:  apr bisect model-f32.gguf model-q4_k.gguf --engine-b llama.cpp --report report.html
    Example:  apr bisect model-q8_0.gguf model-q8_0.gguf --engine-b llama.cpp --precision-a ggml
    """
    _check_trace_sides(a, b)
    model = ToleranceModel(floor=floor, growth=growth)
    if report_path is not None:
        check_writable_path(report_path)  # before both runs, not after them
    found = diff_models(open_model(a), open_model(b)) if is_model(a) and is_model(b) else None
    if found is not None and not wants_json():
        emit(model_diff_report.render_text(found) + "\n")
    sides = SideSpec(a, engine_a), SideSpec(b, engine_b)
    result = run_bisect(
        *sides,
        prompt,
        model=model,
        isolate=isolate,
        keep=keep,
        precisions=(precision_a, precision_b),
        phases=phases,
        progress=lambda label, n: Progress(n, label, force=progress),
    )
    if report_path is not None:
        write_bytes_atomic(report_path, html_report.render(result, found).encode("utf-8"))
    extra = {} if found is None else {"model_diff": model_diff_report.to_doc(found)}
    show(result, lambda r: bisect_report.to_doc(r) | extra, bisect_report.render_text)
    if result.growth.first_jump is not None or result.diff.routing_changed:
        exit_diverged()


PROMPT_OPTIONS: Final = ("prompt_text", "prompt_file", "tokens", "chat", "system", "max_tokens")
RUN_OPTIONS: Final = {"a": ("engine_a", "precision_a"), "b": ("engine_b", "precision_b")}


def _check_trace_sides(a: Path, b: Path) -> None:
    """Refuse (usage error) what `bisect` would ignore for a side that is a trace directory, already run:
    its engine and precision; the prompt (a model beside a trace runs on the trace's own prompt); and, when
    both are traces, --keep and --progress (nothing runs)."""
    traces = {side: is_trace_dir(p) for side, p in (("a", a), ("b", b))}
    if not any(traces.values()):
        return
    given = given_options()
    for side, is_trace in traces.items():
        if is_trace and (flag := next((given[n] for n in RUN_OPTIONS[side] if n in given), None)):
            raise click.UsageError(
                f"{flag} applies to a model; {side.upper()} is a trace directory, already run."
            )
    if prompt := next((given[n] for n in PROMPT_OPTIONS if n in given), None):
        raise click.UsageError(
            f"{prompt} cannot apply: a trace directory brings its own prompt (a model beside it runs on it)."
        )
    if all(traces.values()) and (idle := next((given[n] for n in ("keep", "progress") if n in given), None)):
        raise click.UsageError(f"{idle} applies when a side runs; both sides are trace directories.")
