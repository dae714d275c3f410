"""Commands that run or compare forward passes: `stages`, `trace`, `diff`, `bisect`."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import click
from click.core import ParameterSource

from apr.atomicfile import write_bytes_atomic
from apr.cli.app import (
    COSINE,
    DEFAULT_PROMPT,
    NON_NEGATIVE,
    POSITIVE,
    F,
    Progress,
    cli,
    emit,
    exit_diverged,
    path_arg,
    path_type,
    show,
    wants_json,
)
from apr.diff.bisect import PHASES, SideSpec
from apr.diff.bisect import bisect as run_bisect
from apr.diff.compare import Tolerance, diff_stage_files, diff_traces, require_compared
from apr.diff.growth import ToleranceModel
from apr.diff.models import diff_models, is_model
from apr.diff.stats import diff_stats
from apr.errors import MismatchError
from apr.formats import detect_format
from apr.models import open_model
from apr.models.summary import skeleton
from apr.report import bisect as bisect_report
from apr.report import html as html_report
from apr.report import inspect as inspect_report
from apr.report import json as jsonr
from apr.report import model_diff as model_diff_report
from apr.report import payload as payload_report
from apr.report import stats_diff as stats_diff_report
from apr.report import text
from apr.stages import ALIASES, STAGE_ORDER
from apr.trace.estimate import parse_size
from apr.trace.layout import default_output_dir
from apr.trace.payload import run_payload
from apr.trace.plan import DEFAULT_LAYERS, TracePlan
from apr.trace.prompt import DEFAULT_MAX_TOKENS, Prompt
from apr.trace.reader import is_stats_dir, read_trace
from apr.trace.run import ENGINES, KV_TYPES, PRECISIONS, TraceOptions, prepare_trace

ENGINE_CHOICE = click.Choice(list(ENGINES))


class TokenIds(click.ParamType):  # type: ignore[type-arg]  # generic from click 8.2; 8.1 is allowed
    """`--tokens 1,2,3`: non-negative integers, comma-separated (the model checks them against its vocab)."""

    name = "ids"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        items = [x.strip() for x in str(value).split(",")]
        if items == [""]:
            self.fail("no token ids (give them comma-separated, e.g. 1,2,3).", param, ctx)
        for x in items:
            if not x.isascii() or not x.isdigit():
                self.fail(f"{x!r} is not a token id (a non-negative integer) in {value!r}.", param, ctx)
        return tuple(int(x) for x in items)


def prompt_options(what: str) -> Callable[[F], F]:
    """--prompt / --prompt-file / --tokens / --chat / --system, handed to the command as `prompt: Prompt`."""
    options = [
        click.option(
            "--prompt",
            "prompt_text",
            default=DEFAULT_PROMPT,
            show_default=True,
            help=f"Text to run through {what}.",
        ),
        click.option(
            "--prompt-file", type=path_type(), help="Read the prompt text from this UTF-8 file (all of it)."
        ),
        click.option(
            "--tokens",
            type=TokenIds(),
            metavar="IDS",
            help="Run these token ids (comma-separated: 1,2,3) as given, no tokenizer; checked against "
            "the vocab size.",
        ),
        click.option(
            "--chat",
            is_flag=True,
            help="Apply the model's chat template to the prompt (a user turn and the generation prompt, "
            "as transformers' apply_chat_template).",
        ),
        click.option("--system", metavar="TEXT", help="With --chat: a system message before the user's."),
        click.option(
            "--max-tokens",
            type=click.IntRange(min=1),
            default=DEFAULT_MAX_TOKENS,
            show_default=True,
            help="Refuse a prompt of more tokens (the model's context is always the limit too).",
        ),
    ]

    def decorate(f: F) -> F:
        @functools.wraps(f)
        def command(
            *args: Any,
            prompt_text: str,
            prompt_file: Path | None,
            tokens: tuple[int, ...] | None,
            chat: bool,
            system: str | None,
            max_tokens: int,
            **kw: Any,
        ) -> Any:
            source = click.get_current_context().get_parameter_source("prompt_text")
            given = None if source is ParameterSource.DEFAULT else prompt_text
            prompt = _prompt(given, prompt_file, tokens, chat, system)
            return f(*args, prompt=dataclasses.replace(prompt, max_tokens=max_tokens), **kw)

        for option in reversed(options):
            command = option(command)
        return cast(F, command)

    return decorate


def _prompt(
    given_text: str | None, file: Path | None, tokens: tuple[int, ...] | None, chat: bool, system: str | None
) -> Prompt:
    options = (("--prompt", given_text), ("--prompt-file", file), ("--tokens", tokens))
    given = [name for name, value in options if value is not None]
    if len(given) > 1:
        raise click.UsageError(f"give one of --prompt, --prompt-file, --tokens (got {' and '.join(given)}).")
    if chat and tokens is not None:
        raise click.UsageError("--chat applies the chat template to text; it cannot take --tokens.")
    if system is not None and not chat:
        raise click.UsageError("--system is the system message of --chat; give --chat too.")
    if tokens is not None:
        return Prompt(token_ids=tokens)
    if file is not None:
        return Prompt.from_file(file, chat=chat, system=system)
    return Prompt(DEFAULT_PROMPT if given_text is None else given_text, chat=chat, system=system)


def _stages_doc(_: None) -> dict[str, Any]:
    rows = [
        {"stage": s.value, "per_layer": s.per_layer, "moe": s.moe, "description": s.description}
        for s in STAGE_ORDER
    ]
    return {"stages": rows, "aliases": {k: v.value for k, v in ALIASES.items()}}


def _stages_text(_: None) -> str:
    lines = [f"{s.value:<20} {'layer' if s.per_layer else 'model':<6} {s.description}" for s in STAGE_ORDER]
    return "\n".join(lines + [f"alias: {k} = {v.value}" for k, v in ALIASES.items()]) + "\n"


@cli.command()
def stages() -> None:
    """List the stage vocabulary, in forward order.

    \b
    Example:  apr stages --json
    """
    show(None, _stages_doc, _stages_text)


@cli.command()
@path_arg("file")
@click.option(
    "--save-tensor",
    metavar="STAGES",
    help="Save per-stage F32 tensors (APRT files): comma-separated stage names (see `apr stages`), or all.",
)
@click.option(
    "--save-tensor-dir",
    type=path_type(),
    help="Output directory for --save-tensor (default: <model-dir>/<model-stem>-trace).",
)
@click.option(
    "--save-tensor-layers",
    default=DEFAULT_LAYERS,
    show_default=True,
    metavar="START..END",
    help="Layer range for --save-tensor, END exclusive, or all (every layer of the model).",
)
@click.option(
    "--save-tensor-mode",
    type=click.Choice(["full", "stats"]),
    default="full",
    show_default=True,
    help="full: one APRT file per stage (aprender's layout); stats: per stage and position min, max, "
    "mean, std, absmax, L2, NaN/Inf counts and a sha256 of the values, in one stats.aprs file.",
)
@click.option(
    "--save-tensor-positions",
    default="all",
    show_default=True,
    metavar="START..END",
    help="Prompt positions per-position stages keep ([positions, …]; attn_scores / attn_softmax as "
    "[heads, positions, T]): END exclusive, negative from the end, either side optional (-16.. is the "
    "last 16), last, or all.",
)
@click.option(
    "--max-disk",
    default="4GiB",
    show_default=True,
    metavar="SIZE",
    help="Refuse (exit 5) a trace estimated to write more than SIZE (4GiB, 500M, bytes), or none. "
    "The output filesystem's free space always applies.",
)
@prompt_options("the model")
@click.option(
    "--precision",
    type=click.Choice(list(PRECISIONS)),
    default="f32",
    show_default=True,
    help="Compute precision (f64: a high-precision reference; reference and transformers engines; "
    "ggml: f32 with every matmul as ggml-cpu does it, activations quantized to Q8_0/Q8_1/Q8_K; reference "
    "engine).",
)
@click.option(
    "--engine",
    type=ENGINE_CHOICE,
    default="reference",
    show_default=True,
    help="Who runs the forward pass (transformers, llama.cpp: optional extras).",
)
@click.option(
    "--kv-type",
    type=click.Choice(list(KV_TYPES)),
    default="f32",
    show_default=True,
    help="KV cache element type (f16: K and V rounded to f16 after RoPE, as llama.cpp's default cache; "
    "reference and llama.cpp engines).",
)
@click.option(
    "--lm-head-all", is_flag=True, help="Save lm_head logits for every position, not only the last."
)
@click.option(
    "--payload", is_flag=True, help="Without --save-tensor: report per-layer activation statistics."
)
@click.option(
    "--progress",
    is_flag=True,
    help="Report `layer N/L` on stderr also when it is not a terminal (-q: never).",
)
@click.option(
    "--layer", "layer_filter", help="Without --save-tensor/--payload: filter layers by name substring."
)
def trace(
    file: Path,
    save_tensor: str | None,
    save_tensor_dir: Path | None,
    save_tensor_layers: str,
    save_tensor_mode: str,
    save_tensor_positions: str,
    max_disk: str,
    prompt: Prompt,
    precision: str,
    engine: str,
    kv_type: str,
    lm_head_all: bool,
    payload: bool,
    progress: bool,
    layer_filter: str | None,
) -> None:
    """Run the forward pass on FILE (.gguf, .apr, HF folder) and save the selected stage tensors.

    \b
    Files are aprender's APRT format: <dir>/layer-N/<stage>.bin and <dir>/<stage>.bin, plus a
    manifest.json with the run's model, prompt, tokens, engine, shapes and layouts. Without
    --save-tensor: the metadata-only layer skeleton, or per-layer statistics with --payload.
    The prompt is one of --prompt, --prompt-file (with --chat: the model's chat template) or --tokens.
    Example:  apr trace model.gguf --save-tensor all --save-tensor-layers 0..4
    Example:  apr trace model.gguf --save-tensor lm_head --chat --prompt "Hi" --system "Be brief."
    Example:  apr trace m-q4_k.gguf --save-tensor all --precision ggml --kv-type f16   # as llama.cpp runs it
    """
    options = TraceOptions(engine, precision, lm_head_all, kv_type=kv_type)
    if save_tensor is None:
        _trace_report(file, prompt, options, payload, layer_filter)
        return
    # before any model I/O
    plan = TracePlan.from_cli(save_tensor, save_tensor_layers, save_tensor_positions, save_tensor_mode)
    options = replace(options, max_disk=parse_size(max_disk))
    out_dir = save_tensor_dir or default_output_dir(file)
    quiet_header = wants_json()
    fmt = detect_format(file)
    if not quiet_header:
        emit(text.render_trace_header(fmt.name, file, save_tensor, save_tensor_layers, out_dir))
    prepared = prepare_trace(file, prompt, options.engine)
    disk = prepared.estimate_disk(plan, out_dir, options)
    if not quiet_header:
        emit(text.render_prompt(prepared.shown_prompt, prepared.token_ids))
        emit(text.render_disk_estimate(disk.bytes, disk.free))
    disk.check()
    on_layer = Progress(prepared.model.config.n_layers, "layer", force=progress)
    outcome = prepared.run(plan, out_dir, replace(options, on_layer=on_layer))
    show(outcome, jsonr.trace_outcome_doc, text.render_trace_outcome)


def _trace_report(
    file: Path, prompt: Prompt, options: TraceOptions, payload: bool, layer_filter: str | None
) -> None:
    """`apr trace --payload` (activation statistics) or the metadata-only layer skeleton."""
    if payload:
        prepared = prepare_trace(file, prompt)
        progress = Progress(prepared.model.config.n_layers, "layer")
        report = run_payload(prepared, replace(options, on_layer=progress))
        show(report, payload_report.to_doc, payload_report.render_text)
        return
    sk = skeleton(open_model(file), layer_filter)
    show(sk, inspect_report.skeleton_doc, inspect_report.render_skeleton)


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
def diff(
    a: Path,
    b: Path,
    values: bool,
    limit: int,
    min_cos: float | None,
    max_rel: float | None,
    check: bool,
) -> None:
    """Compare two models, two trace directories or two stage files (APRT).

    \b
    Two models (any formats): config, tokenizer and tensor set, before any forward pass
    (--check: exit 1 when they differ in more than storage and types).
    Two directories: one row per common stage in forward order, first divergence marked.
    Two files: aprender's max|diff|, RMS, cosine and top-N report, element by element; stage
    files of apr traces are aligned (Q/K layout, positions) as in directory mode, and a Q/K
    stage whose layout no manifest gives is refused (exit 5).
    Example:  apr diff run-a/ run-b/ --values --check --min-cos 0.9999
              apr diff model.gguf model-hf/
    """
    tolerance = Tolerance.from_options(min_cos, max_rel)
    if is_model(a) and is_model(b):  # one model against a trace: the trace checks below say what it is
        found = diff_models(open_model(a), open_model(b))
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
    type=path_type(),
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
    model = ToleranceModel(floor=floor, growth=growth)
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
