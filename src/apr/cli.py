"""The `apr` command line: parse arguments, make one library call, render, map errors to exit codes.

Exit codes: 0 ok / within tolerance · 1 divergence found (`diff --check`, `bisect`) · 2 usage error ·
3 file not found · 4 invalid file format · 5 validation failed · 6 model load failed · 7 I/O error ·
8 inference failed · 9 optional extra not installed · 70 internal error (a bug: please report it).
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import click

from apr import __version__
from apr.diff.compare import Tolerance, diff_stage_files, diff_traces
from apr.errors import AprError, ExitCode, MismatchError
from apr.report import json as jsonr
from apr.report import text
from apr.trace.plan import DEFAULT_LAYERS, TracePlan
from apr.trace.reader import read_trace
from apr.trace.stages import STAGE_ORDER

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
@json_option
def trace(
    file: Path,
    save_tensor: str | None,
    save_tensor_dir: Path | None,
    save_tensor_layers: str,
    prompt: str,
    as_json: bool,
) -> None:
    """Run the forward pass on FILE and save the selected stage tensors.

    \b
    Example:  apr trace model.gguf --save-tensor all --save-tensor-layers 0..4
    """
    if save_tensor is not None:
        TracePlan.from_cli(save_tensor, save_tensor_layers)  # plan errors come before any model I/O
    raise AprError("tracing is not available yet: the forward pass has not been implemented")


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


def main() -> None:
    cli(prog_name="apr")
