"""The `apr` command line: parse arguments, make one library call, render, map errors to exit codes.

Exit codes: 0 ok / within tolerance · 1 divergence found (`diff --check`, `bisect`) · 2 usage error ·
3 file not found · 4 invalid file format · 5 validation failed · 6 model load failed · 7 I/O error ·
8 inference failed · 9 optional extra not installed · 70 internal error (a bug: please report it).
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, TypeVar

import click

from apr.atomicfile import write_bytes_atomic
from apr.convert.export import export_safetensors
from apr.convert.importer import convert_apr, import_gguf
from apr.diff.bisect import SideSpec
from apr.diff.bisect import bisect as run_bisect
from apr.diff.compare import Tolerance, diff_stage_files, diff_traces
from apr.diff.growth import ToleranceModel
from apr.errors import AprError, ExitCode, MismatchError
from apr.formats import detect_format, open_checkpoint
from apr.formats.summary import skeleton, summarize
from apr.report import bisect as bisect_report
from apr.report import html as html_report
from apr.report import inspect as inspect_report
from apr.report import json as jsonr
from apr.report import payload as payload_report
from apr.report import text
from apr.trace.layout import default_output_dir
from apr.trace.payload import run_payload
from apr.trace.plan import DEFAULT_LAYERS, TracePlan
from apr.trace.reader import read_trace
from apr.trace.run import TraceOptions, prepare_trace
from apr.trace.stages import STAGE_ORDER
from apr.version import __version__

INTERNAL_ERROR: Final = 70
DEFAULT_PROMPT: Final = "What is 2+2?"
F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Ctx:
    json: bool = False
    verbose: bool = False
    quiet: bool = False
    debug: bool = False


def json_option(f: F) -> F:
    """`--json` on a command, OR-ed with the global `apr --json`."""
    return click.option("--json", "as_json", is_flag=True, help="Output as JSON.")(f)


def _ctx() -> Ctx:
    obj = click.get_current_context().find_object(Ctx)
    return obj if obj is not None else Ctx()


def emit(s: str) -> None:
    """Human output: suppressed by --quiet (JSON output is never suppressed)."""
    if not _ctx().quiet:
        click.echo(s, nl=False)


class AprGroup(click.Group):
    """Maps the AprError hierarchy to `error: <message>` + exit code, in one place."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AprError as e:
            _fail(ctx, str(e), int(e.exit_code))
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            _fail(ctx, f"{e.strerror or e}{where}", int(ExitCode.IO))
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            _fail(ctx, "interrupted", 130)
        except Exception as e:
            _fail(
                ctx,
                f"internal error: {type(e).__name__}: {e} (re-run with --debug)",
                INTERNAL_ERROR,
            )


def _fail(ctx: click.Context, message: str, code: int) -> None:
    obj = ctx.find_object(Ctx)
    if obj is not None and obj.debug:
        traceback.print_exc()
    click.echo(f"error: {message}", err=True)
    ctx.exit(code)


@click.group(cls=AprGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="apr")
@click.option("--json", "as_json", is_flag=True, help="Output as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Verbose output.")
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="Suppress stdout (errors still go to stderr; --json still prints).",
)
@click.option("--debug", is_flag=True, help="Show a traceback on errors.")
@click.pass_context
def cli(ctx: click.Context, as_json: bool, verbose: bool, quiet: bool, debug: bool) -> None:
    """Trace an LLM's forward pass stage by stage and find where two runs part ways.

    \b
    Exit codes: 0 ok · 1 divergence found (diff --check, bisect) · 2 usage error · 3 file not found
    · 4 invalid file format · 5 validation failed · 6 model load failed · 7 I/O error
    · 8 inference failed · 9 optional extra not installed · 70 internal error
    """
    ctx.obj = Ctx(as_json, verbose, quiet, debug)


@cli.command()
@json_option
def stages(as_json: bool) -> None:
    """List the stage vocabulary, in forward order.

    \b
    Example:  apr stages --json
    """
    rows = [
        {"stage": s.value, "per_layer": s.per_layer, "moe": s.moe, "description": s.description}
        for s in STAGE_ORDER
    ]
    if as_json or _ctx().json:
        click.echo(jsonr.dumps({"stages": rows, "aliases": {"layer_output": "post_ffn_residual"}}))
        return
    lines = [f"{r['stage']:<20} {'layer' if r['per_layer'] else 'model':<6} {r['description']}" for r in rows]
    emit("\n".join(lines) + "\nalias: layer_output = post_ffn_residual\n")


class Progress:
    """`layer 3/30` on stderr, only on a terminal and never with --quiet or --json."""

    def __init__(self, total: int, label: str) -> None:
        ctx = _ctx()
        self.on = sys.stderr.isatty() and not ctx.quiet and not ctx.json
        self.total, self.label = total, label

    def __call__(self, i: int) -> None:
        if self.on:
            end = "\n" if i + 1 == self.total else ""
            click.echo(f"\r{self.label} {i + 1}/{self.total}", err=True, nl=False)
            click.echo(end, err=True, nl=False)


@cli.command()
@click.argument("file", type=click.Path(path_type=Path, readable=False))
@click.option(
    "--save-tensor",
    "save_tensor",
    metavar="STAGES",
    help="Save per-stage F32 tensors (APRT files). Comma-separated stage names (see `apr stages`), or `all`.",
)
@click.option(
    "--save-tensor-dir",
    type=click.Path(path_type=Path, readable=False),
    help="Output directory for --save-tensor (default: <model-dir>/<model-stem>-trace).",
)
@click.option(
    "--save-tensor-layers",
    default=DEFAULT_LAYERS,
    show_default=True,
    metavar="START..END",
    help="Layer range for --save-tensor, END exclusive.",
)
@click.option("--prompt", default=DEFAULT_PROMPT, show_default=True, help="Text to run through the model.")
@click.option(
    "--precision",
    type=click.Choice(["f32", "f64"]),
    default="f32",
    show_default=True,
    help="Compute precision of the reference engine (f64: high-precision reference).",
)
@click.option(
    "--engine",
    type=click.Choice(["reference", "transformers", "llama.cpp"]),
    default="reference",
    show_default=True,
    help="Who runs the forward pass (transformers / llama.cpp: optional extras).",
)
@click.option(
    "--lm-head-all", is_flag=True, help="Save lm_head logits for every position, not only the last."
)
@click.option(
    "--payload", is_flag=True, help="Trace the prompt through the model and report per-layer statistics."
)
@click.option(
    "--layer", "layer_filter", help="Without --save-tensor/--payload: filter layers by name substring."
)
@json_option
def trace(
    file: Path,
    save_tensor: str | None,
    save_tensor_dir: Path | None,
    save_tensor_layers: str,
    prompt: str,
    precision: str,
    engine: str,
    lm_head_all: bool,
    payload: bool,
    layer_filter: str | None,
    as_json: bool,
) -> None:
    """Run the forward pass on FILE (.gguf, .apr, HF folder) and save the selected stage tensors.

    \b
    Files are aprender's APRT format: <dir>/layer-N/<stage>.bin and <dir>/<stage>.bin, plus a
    manifest.json with the run's model, tokens, engine, shapes and layouts.
    Example:  apr trace model.gguf --save-tensor all --save-tensor-layers 0..4
    """
    as_json = as_json or _ctx().json
    options = TraceOptions(engine, precision, lm_head_all)
    if save_tensor is None:
        _trace_report(file, prompt, options, payload, layer_filter, as_json)
        return
    plan = TracePlan.from_cli(save_tensor, save_tensor_layers)  # plan errors come before any model I/O
    out_dir = save_tensor_dir or default_output_dir(file)
    fmt = detect_format(file)
    if not as_json:
        emit(text.render_trace_header(fmt.name, file, save_tensor, save_tensor_layers, out_dir))
    prepared = prepare_trace(file, prompt)
    if not as_json:
        emit(text.render_prompt(prompt, prepared.token_ids))
    progress = Progress(prepared.ckpt.config.n_layers, "layer")
    outcome = prepared.run(plan, out_dir, replace(options, on_layer=progress))
    if as_json:
        click.echo(jsonr.dumps(jsonr.trace_outcome_doc(outcome)))
    else:
        emit(text.render_trace_outcome(outcome))


def _trace_report(
    file: Path, prompt: str, options: TraceOptions, payload: bool, layer_filter: str | None, as_json: bool
) -> None:
    """`apr trace --payload` (activation statistics) or the metadata-only layer skeleton."""
    if payload:
        prepared = prepare_trace(file, prompt)
        report = run_payload(
            prepared, replace(options, on_layer=Progress(prepared.ckpt.config.n_layers, "layer"))
        )
        click.echo(jsonr.dumps(payload_report.to_doc(report))) if as_json else emit(
            payload_report.render_text(report)
        )
        return
    sk = skeleton(open_checkpoint(file), layer_filter)
    click.echo(jsonr.dumps(inspect_report.skeleton_doc(sk))) if as_json else emit(
        inspect_report.render_skeleton(sk)
    )


@cli.command()
@click.argument("a", type=click.Path(path_type=Path, readable=False))
@click.argument("b", type=click.Path(path_type=Path, readable=False))
@click.option("--values", is_flag=True, help="Compare tensor values (the only comparison of trace files).")
@click.option(
    "--limit",
    default=10,
    show_default=True,
    type=click.IntRange(min=0),
    help="Top-N element differences shown for two stage files.",
)
@click.option(
    "--min-cos",
    type=float,
    default=None,
    help="A stage diverges when its cosine is below this (default rule: 0.999).",
)
@click.option("--max-rel", type=float, default=None, help="A stage diverges when ‖a−b‖/‖b‖ exceeds this.")
@click.option("--check", is_flag=True, help="Exit 1 when any compared stage diverges.")
@json_option
def diff(
    a: Path,
    b: Path,
    values: bool,
    limit: int,
    min_cos: float | None,
    max_rel: float | None,
    check: bool,
    as_json: bool,
) -> None:
    """Compare two stage files (APRT) or two trace directories, element by element.

    \b
    Two files: aprender's max|diff|, RMS, cosine and top-N report.
    Two directories: one row per common stage in forward order, first divergence marked.
    Example:  apr diff run-a/ run-b/ --values --check --min-cos 0.9999
    """
    as_json = as_json or _ctx().json
    if a.is_dir() != b.is_dir() and a.exists() and b.exists():
        kinds = ("directory" if a.is_dir() else "file", "directory" if b.is_dir() else "file")
        raise MismatchError(f"cannot compare a {kinds[0]} ({a}) with a {kinds[1]} ({b})")
    if a.is_dir():
        result = diff_traces(read_trace(a), read_trace(b), Tolerance.from_options(min_cos, max_rel))
        click.echo(jsonr.dumps(jsonr.trace_diff_doc(result))) if as_json else emit(
            text.render_trace_diff(result)
        )
        if check and result.diverged:
            sys.exit(int(ExitCode.DIVERGED))
        return
    single = diff_stage_files(a, b, limit)
    click.echo(jsonr.dumps(jsonr.stage_file_diff_doc(single))) if as_json else emit(
        text.render_stage_file_diff(single)
    )
    if check and not Tolerance.from_options(min_cos, max_rel).passes(single.metrics):
        sys.exit(int(ExitCode.DIVERGED))


@cli.command()
@click.argument("model", type=click.Path(path_type=Path, readable=False))
@click.option("--no-tensors", is_flag=True, help="Omit the tensor table.")
@click.option(
    "--verify", is_flag=True, help="Also verify whole-file checksums (.apr footer CRC; reads the file)."
)
@json_option
def inspect(model: Path, no_tensors: bool, verify: bool, as_json: bool) -> None:
    """Show a model's format, architecture, config, tokenizer and tensor table (no tensor data read).

    \b
    Example:  apr inspect SmolLM2-135M-Instruct.Q4_1.gguf --json
    """
    summary = summarize(open_checkpoint(model), verify)
    if as_json or _ctx().json:
        click.echo(jsonr.dumps(inspect_report.inspect_doc(summary)))
    else:
        emit(inspect_report.render_inspect(summary, tensors=not no_tensors))


ENGINES_CHOICE = click.Choice(["reference", "transformers", "llama.cpp"])


@cli.command("bisect")
@click.argument("a", type=click.Path(path_type=Path, readable=False))
@click.argument("b", type=click.Path(path_type=Path, readable=False))
@click.option("--prompt", default=DEFAULT_PROMPT, show_default=True, help="Text to run through both sides.")
@click.option("--engine-a", type=ENGINES_CHOICE, default="reference", show_default=True, help="Who runs A.")
@click.option("--engine-b", type=ENGINES_CHOICE, default="reference", show_default=True, help="Who runs B.")
@click.option(
    "--isolate", is_flag=True, help="Re-run each layer of B on A's input to it: own vs inherited error."
)
@click.option(
    "--growth",
    type=float,
    default=8.0,
    show_default=True,
    help="Error growth a stage may show over its inputs before it counts as a jump.",
)
@click.option(
    "--floor", type=float, default=1e-4, show_default=True, help="Relative error any stage may add."
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(path_type=Path, readable=False),
    help="Also write a self-contained HTML report with per-layer charts.",
)
@click.option(
    "--keep",
    type=click.Path(path_type=Path, readable=False),
    help="Keep the two traces in this directory (default: a temporary one).",
)
@json_option
def bisect_cmd(
    a: Path,
    b: Path,
    prompt: str,
    engine_a: str,
    engine_b: str,
    isolate: bool,
    growth: float,
    floor: float,
    report_path: Path | None,
    keep: Path | None,
    as_json: bool,
) -> None:
    """Find the first stage where B parts ways with A (models in any format, or trace directories).

    \b
    Both sides run on the same token ids; each stage's relative error is compared with the error its
    inputs already carry: a stage that adds more than growth × input error + its weights' expected
    quantization error is the first divergence. Exit 1 when one is found, 0 when none.
    Example:  apr bisect model-f32.gguf model-q4_k.gguf --engine-b llama.cpp --report report.html
    """
    model = ToleranceModel(floor=floor, growth=growth)
    result = run_bisect(
        SideSpec(a, engine_a), SideSpec(b, engine_b), prompt, model=model, isolate=isolate, keep=keep
    )
    if report_path is not None:
        write_bytes_atomic(report_path, html_report.render(result).encode("utf-8"))
    if as_json or _ctx().json:
        click.echo(jsonr.dumps(bisect_report.to_doc(result)))
    else:
        emit(bisect_report.render_text(result))
    if result.growth.first_jump is not None:
        sys.exit(int(ExitCode.DIVERGED))


@cli.command("import")
@click.argument("source", type=click.Path(path_type=Path, readable=False))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, readable=False),
    help="Output .apr file (default: SOURCE with the suffix .apr).",
)
@click.option(
    "--quantize",
    type=click.Choice(["q4_k", "q6_k", "q8_0"], case_sensitive=False),
    help="Requantize 2-D weights (default: keep F32/F16/BF16/Q4_K/Q6_K bytes, store others as exact F32).",
)
@json_option
def import_(source: Path, output: Path | None, quantize: str | None, as_json: bool) -> None:
    """Convert a GGUF model to aprender's .apr v2 (names, config, tokenizer, tied embeddings).

    \b
    Example:  apr import SmolLM2-135M-Instruct.Q4_1.gguf -o smollm2.apr
    """
    out = output or source.with_suffix(".apr")
    result = import_gguf(source, out, quantize)
    if as_json or _ctx().json:
        click.echo(jsonr.dumps(jsonr.import_doc(result)))
    else:
        emit(text.render_import(result))


@cli.command()
@click.argument("file", type=click.Path(path_type=Path, readable=False))
@click.option(
    "-o", "--output", type=click.Path(path_type=Path, readable=False), required=True, help="Output .apr file."
)
@click.option(
    "--quantize",
    type=click.Choice(["q4_k", "q6_k", "q8_0"], case_sensitive=False),
    required=True,
    help="Quantize every 2-D weight whose rows fit the block size (norms and biases stay F32).",
)
@json_option
def convert(file: Path, output: Path, quantize: str, as_json: bool) -> None:
    """Requantize an .apr model into a new .apr file (APR → APR).

    \b
    Example:  apr convert smollm2.apr -o smollm2-q4k.apr --quantize q4_k
    """
    result = convert_apr(file, output, quantize)
    if as_json or _ctx().json:
        click.echo(jsonr.dumps(jsonr.import_doc(result)))
    else:
        emit(text.render_import(result))


@cli.command()
@click.argument("model", type=click.Path(path_type=Path, readable=False))
@click.option(
    "-o", "--output", type=click.Path(path_type=Path, readable=False), required=True, help="Output folder."
)
@click.option("--format", "fmt", type=click.Choice(["safetensors"]), default="safetensors", show_default=True)
@click.option("--dtype", type=click.Choice(["f32", "f16"]), default="f32", show_default=True)
@json_option
def export(model: Path, output: Path, fmt: str, dtype: str, as_json: bool) -> None:
    """Write MODEL (.gguf, .apr) as a Hugging Face folder that transformers loads offline.

    \b
    Q/K rows stored in GGUF order are put back in HF order; quantized tensors are dequantized exactly.
    Example:  apr export smollm2.gguf -o smollm2-hf/
    """
    result = export_safetensors(open_checkpoint(model), output, dtype)
    if as_json or _ctx().json:
        click.echo(jsonr.dumps(jsonr.export_doc(result)))
    else:
        emit(text.render_export(result))


def main() -> None:
    cli(prog_name="apr")
