"""The `apr` click group and what every command shares: global flags, output, progress, error mapping.

Every command parses its arguments, makes one library call, renders the result (`show`), and lets the
AprError hierarchy map to `error: <message>` on stderr and its exit code — here, in one place.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import click

from apr.errors import AprError, ExitCode
from apr.report import json as jsonr
from apr.version import __version__

INTERNAL_ERROR: Final = 70
DEFAULT_PROMPT: Final = "What is 2+2?"
F = TypeVar("F", bound=Callable[..., Any])
R = TypeVar("R")


def path_arg(name: str) -> Callable[[F], F]:
    """A path argument; existence and readability are checked by the library, with its own messages."""
    return click.argument(name, type=click.Path(path_type=Path, readable=False))


def path_type() -> click.Path:
    return click.Path(path_type=Path, readable=False)


@dataclass
class Ctx:
    json: bool = False
    quiet: bool = False
    debug: bool = False


def json_option(f: F) -> F:
    """`--json` on a command, OR-ed with the global `apr --json`."""
    return click.option("--json", "as_json", is_flag=True, help="Output as JSON.")(f)


def ctx() -> Ctx:
    obj = click.get_current_context().find_object(Ctx)
    return obj if obj is not None else Ctx()


def wants_json(as_json: bool) -> bool:
    return as_json or ctx().json


def emit(s: str) -> None:
    """Human output: suppressed by --quiet (JSON output is never suppressed)."""
    if not ctx().quiet:
        click.echo(s, nl=False)


def show(result: R, as_json: bool, doc: Callable[[R], dict[str, Any]], render: Callable[[R], str]) -> None:
    """Print a result as JSON (`--json`) or as text."""
    if wants_json(as_json):
        click.echo(jsonr.dumps(doc(result)))
    else:
        emit(render(result))


def exit_diverged() -> None:
    sys.exit(int(ExitCode.DIVERGED))


class Progress:
    """`layer 3/30` on stderr, only on a terminal and never with --quiet or --json."""

    def __init__(self, total: int, label: str) -> None:
        c = ctx()
        self.on = sys.stderr.isatty() and not c.quiet and not c.json
        self.total, self.label = total, label

    def __call__(self, i: int) -> None:
        if self.on:
            end = "\n" if i + 1 == self.total else ""
            click.echo(f"\r{self.label} {i + 1}/{self.total}{end}", err=True, nl=False)


class AprGroup(click.Group):
    """Maps the AprError hierarchy to `error: <message>` + exit code, in one place."""

    def invoke(self, context: click.Context) -> Any:
        try:
            return super().invoke(context)
        except AprError as e:
            _fail(context, str(e), int(e.exit_code))
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            _fail(context, f"{e.strerror or e}{where}", int(ExitCode.IO))
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            _fail(context, "interrupted", 130)
        except Exception as e:
            _fail(context, f"internal error: {type(e).__name__}: {e} (re-run with --debug)", INTERNAL_ERROR)


def _fail(context: click.Context, message: str, code: int) -> None:
    obj = context.find_object(Ctx)
    if obj is not None and obj.debug:
        traceback.print_exc()
    click.echo(f"error: {message}", err=True)
    context.exit(code)


@click.group(cls=AprGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="apr")
@click.option("--json", "as_json", is_flag=True, help="Output as JSON.")
@click.option(
    "-q", "--quiet", is_flag=True, help="Suppress stdout (errors still go to stderr; --json still prints)."
)
@click.option("--debug", is_flag=True, help="Show a traceback on errors.")
@click.pass_context
def cli(context: click.Context, as_json: bool, quiet: bool, debug: bool) -> None:
    """Trace an LLM's forward pass stage by stage and find where two runs part ways.

    \b
    Exit codes: 0 ok · 1 divergence found (diff --check, bisect) · 2 usage error · 3 file not found
    · 4 invalid file format · 5 validation failed · 6 model load failed · 7 I/O error
    · 8 inference failed · 9 optional extra not installed · 70 internal error
    """
    context.obj = Ctx(as_json, quiet, debug)
