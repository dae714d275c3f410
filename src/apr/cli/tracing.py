"""Commands that run forward passes: `stages`, `trace` (the comparing ones are in cli/comparing.py)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Final, cast

import click
from click.core import ParameterSource

from apr.cli.app import (
    DEFAULT_PROMPT,
    F,
    Progress,
    cli,
    emit,
    given_options,
    path_arg,
    path_type,
    show,
    wants_json,
)
from apr.formats import detect_format
from apr.models import open_model
from apr.report import json as jsonr
from apr.report import text
from apr.stages import ALIASES, STAGE_ORDER
from apr.trace.estimate import parse_size
from apr.trace.layout import default_output_dir
from apr.trace.outdir import check_out_dir
from apr.trace.plan import DEFAULT_LAYERS, TracePlan
from apr.trace.prompt import DEFAULT_MAX_TOKENS, Prompt
from apr.trace.run import ENGINES, KV_TYPES, PRECISIONS, TraceOptions, prepare_trace

ENGINE_CHOICE = click.Choice(list(ENGINES))

# `apr trace` options that the other modes would silently ignore: refused there, as --system without --chat
SAVE_TENSOR_ONLY: Final = (
    "save_tensor_dir", "save_tensor_layers", "save_tensor_mode", "save_tensor_positions", "max_disk"
)  # fmt: skip
FORWARD_ONLY: Final = (  # the layer skeleton (neither --save-tensor nor --payload) runs no forward pass
    "prompt_text", "prompt_file", "tokens", "chat", "system", "max_tokens", "precision", "engine", "kv_type",
    "lm_head_all", "progress",
)  # fmt: skip


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
    _check_mode(save_tensor is not None, payload)
    options = TraceOptions(engine, precision, lm_head_all, kv_type=kv_type)
    if save_tensor is None:
        _trace_report(file, prompt, options, payload, layer_filter, progress)
        return
    # before any model I/O
    plan = TracePlan.from_cli(save_tensor, save_tensor_layers, save_tensor_positions, save_tensor_mode)
    options = replace(options, max_disk=parse_size(max_disk))
    out_dir = save_tensor_dir or default_output_dir(file)
    quiet_header = wants_json()
    fmt = detect_format(file)
    check_out_dir(out_dir)  # before the model loads: "." or a path under a file can never be written
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


def _check_mode(save_tensor: bool, payload: bool) -> None:
    """Refuse an option that the mode `apr trace` runs in would ignore (a usage error, exit 2)."""
    given = given_options()
    if save_tensor and payload:
        raise click.UsageError("give one of --save-tensor, --payload (got both).")
    if save_tensor or payload:
        if "layer_filter" in given:
            raise click.UsageError(
                "--layer filters the layer skeleton; it cannot take --save-tensor or --payload "
                "(the layers --save-tensor saves: --save-tensor-layers)."
            )
    elif needless := [given[n] for n in FORWARD_ONLY if n in given]:
        raise click.UsageError(
            f"{needless[0]} applies to a forward pass; give --save-tensor or --payload too."
        )
    if not save_tensor and (needless := [given[n] for n in SAVE_TENSOR_ONLY if n in given]):
        raise click.UsageError(f"{needless[0]} applies to --save-tensor; give --save-tensor too.")


def _trace_report(
    file: Path,
    prompt: Prompt,
    options: TraceOptions,
    payload: bool,
    layer_filter: str | None,
    progress: bool,
) -> None:
    """`apr trace --payload` (activation statistics) or the metadata-only layer skeleton."""
    # these modes' modules load only for them, not on every `apr trace`
    from apr.models.summary import skeleton
    from apr.report import inspect as inspect_report
    from apr.report import payload as payload_report
    from apr.trace.payload import run_payload

    if payload:
        prepared = prepare_trace(file, prompt)
        on_layer = Progress(prepared.model.config.n_layers, "layer", force=progress)
        report = run_payload(prepared, replace(options, on_layer=on_layer))
        show(report, payload_report.to_doc, payload_report.render_text)
        return
    sk = skeleton(open_model(file), layer_filter)
    show(sk, inspect_report.skeleton_doc, inspect_report.render_skeleton)
