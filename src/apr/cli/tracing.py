"""Commands that run or compare forward passes: `stages`, `trace`, `diff`, `bisect`."""

from __future__ import annotations

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
from apr.diff.bisect import SideSpec
from apr.diff.bisect import bisect as run_bisect
from apr.diff.compare import Tolerance, diff_stage_files, diff_traces, require_compared
from apr.diff.growth import ToleranceModel
from apr.errors import MismatchError
from apr.formats import detect_format
from apr.models import open_model
from apr.models.summary import skeleton
from apr.report import bisect as bisect_report
from apr.report import html as html_report
from apr.report import inspect as inspect_report
from apr.report import json as jsonr
from apr.report import payload as payload_report
from apr.report import text
from apr.stages import ALIASES, STAGE_ORDER
from apr.trace.layout import default_output_dir
from apr.trace.payload import run_payload
from apr.trace.plan import DEFAULT_LAYERS, TracePlan
from apr.trace.prompt import Prompt
from apr.trace.reader import read_trace
from apr.trace.run import ENGINES, PRECISIONS, TraceOptions, prepare_trace

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
            **kw: Any,
        ) -> Any:
            source = click.get_current_context().get_parameter_source("prompt_text")
            given = None if source is ParameterSource.DEFAULT else prompt_text
            return f(*args, prompt=_prompt(given, prompt_file, tokens, chat, system), **kw)

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
    help="Layer range for --save-tensor, END exclusive.",
)
@prompt_options("the model")
@click.option(
    "--precision",
    type=click.Choice(list(PRECISIONS)),
    default="f32",
    show_default=True,
    help="Compute precision (f64: a high-precision reference; reference and transformers engines).",
)
@click.option(
    "--engine",
    type=ENGINE_CHOICE,
    default="reference",
    show_default=True,
    help="Who runs the forward pass (transformers, llama.cpp: optional extras).",
)
@click.option(
    "--lm-head-all", is_flag=True, help="Save lm_head logits for every position, not only the last."
)
@click.option(
    "--payload", is_flag=True, help="Without --save-tensor: report per-layer activation statistics."
)
@click.option(
    "--layer", "layer_filter", help="Without --save-tensor/--payload: filter layers by name substring."
)
def trace(
    file: Path,
    save_tensor: str | None,
    save_tensor_dir: Path | None,
    save_tensor_layers: str,
    prompt: Prompt,
    precision: str,
    engine: str,
    lm_head_all: bool,
    payload: bool,
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
    """
    options = TraceOptions(engine, precision, lm_head_all)
    if save_tensor is None:
        _trace_report(file, prompt, options, payload, layer_filter)
        return
    plan = TracePlan.from_cli(save_tensor, save_tensor_layers)  # plan errors come before any model I/O
    out_dir = save_tensor_dir or default_output_dir(file)
    quiet_header = wants_json()
    fmt = detect_format(file)
    if not quiet_header:
        emit(text.render_trace_header(fmt.name, file, save_tensor, save_tensor_layers, out_dir))
    prepared = prepare_trace(file, prompt, options.engine)
    if not quiet_header:
        emit(text.render_prompt(prepared.shown_prompt, prepared.token_ids))
    progress = Progress(prepared.model.config.n_layers, "layer")
    outcome = prepared.run(plan, out_dir, replace(options, on_layer=progress))
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
    help="Exit 1 when any compared stage diverges (an error when no stage could be compared).",
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
    """Compare two stage files (APRT) or two trace directories, element by element.

    \b
    Two files: aprender's max|diff|, RMS, cosine and top-N report.
    Two directories: one row per common stage in forward order, first divergence marked.
    Example:  apr diff run-a/ run-b/ --values --check --min-cos 0.9999
    """
    tolerance = Tolerance.from_options(min_cos, max_rel)
    if a.is_dir() != b.is_dir() and a.exists() and b.exists():
        kinds = ("directory" if a.is_dir() else "file", "directory" if b.is_dir() else "file")
        raise MismatchError(f"cannot compare a {kinds[0]} ({a}) with a {kinds[1]} ({b})")
    if a.is_dir():
        result = diff_traces(read_trace(a), read_trace(b), tolerance)
        if check:
            require_compared(result)
        show(result, jsonr.trace_diff_doc, text.render_trace_diff)
        if check and result.diverged:
            exit_diverged()
        return
    single = diff_stage_files(a, b, limit)
    show(single, jsonr.stage_file_diff_doc, text.render_stage_file_diff)
    if check and not tolerance.passes(single.metrics):
        exit_diverged()


@cli.command("bisect")
@path_arg("a")
@path_arg("b")
@prompt_options("both sides")
@click.option("--engine-a", type=ENGINE_CHOICE, default="reference", show_default=True, help="Who runs A.")
@click.option("--engine-b", type=ENGINE_CHOICE, default="reference", show_default=True, help="Who runs B.")
@click.option(
    "--isolate", is_flag=True, help="Re-run each layer of B on A's input to it: own vs inherited error."
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
) -> None:
    """Find the first stage where B parts ways with A (models in any format, or trace directories).

    \b
    Both sides run on the same token ids (their tokenizers must agree on the prompt; --tokens gives
    both the ids, no tokenizer involved); each stage's relative error is compared with the error its
    inputs already carry: a stage that adds more than growth × input error + its weights' expected
    quantization error is the first divergence. Exit 1 when one is found, 0 when none.
    Example:  apr bisect model-f32.gguf model-q4_k.gguf --engine-b llama.cpp --report report.html
    """
    model = ToleranceModel(floor=floor, growth=growth)
    sides = SideSpec(a, engine_a), SideSpec(b, engine_b)
    result = run_bisect(*sides, prompt, model=model, isolate=isolate, keep=keep)
    if report_path is not None:
        write_bytes_atomic(report_path, html_report.render(result).encode("utf-8"))
    show(result, bisect_report.to_doc, bisect_report.render_text)
    if result.growth.first_jump is not None:
        exit_diverged()
