"""The `apr` click group and what every command shares: global flags, output, progress, error mapping.

Every command parses its arguments, makes one library call, renders the result (`show`), and leaves errors
to this module. Every error — the AprError hierarchy, OSError, and click's own usage errors (bad option,
missing argument, bad choice or value: exit 2) — is one line, `error: <message>`, on stderr; with `--json`
also `{"error": ..., "exit_code": N}` on stdout. The global flags (`--json`, `-q`, `--debug`) are accepted
before the command or after it: the group and every command carry their own copy, and both set `Ctx`.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, NoReturn, TypeVar

import click
from click.core import ParameterSource

from apr.errors import AprError, ExitCode
from apr.report import json as jsonr
from apr.version import __version__

PROG: Final = "apr"
INTERNAL_ERROR: Final = 70
INTERRUPTED: Final = 130
DEFAULT_PROMPT: Final = "What is 2+2?"
F = TypeVar("F", bound=Callable[..., Any])
R = TypeVar("R")


def path_arg(name: str) -> Callable[[F], F]:
    """A path argument; existence and readability are checked by the library, with its own messages."""
    return click.argument(name, type=click.Path(path_type=Path, readable=False))


def path_type() -> click.Path:
    return click.Path(path_type=Path, readable=False)


class FileOutput(click.Path):
    """An output that is one file: a value ending in a path separator names a folder, and is a usage
    error rather than a file written under the folder's name (Path would drop the separator)."""

    def __init__(self) -> None:
        super().__init__(path_type=Path, readable=False)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.endswith(("/", os.sep)):
            self.fail(
                f"{value} names a folder (it ends in /), but this writes one file: name the file.", param, ctx
            )
        return super().convert(value, param, ctx)


def names_folder(value: str) -> bool:
    """Whether an output written as `value` names a folder by its trailing separator."""
    return value.endswith(("/", os.sep))


class Threshold(click.FloatRange):
    """A FloatRange that also refuses NaN (which every range comparison lets through) and infinities."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        x = super().convert(value, param, ctx)
        if not math.isfinite(x):
            self.fail(f"{value} is not a finite number.", param, ctx)
        return x


COSINE: Final = Threshold(-1, 1)  # int bounds read "-1<=x<=1" in messages and help
NON_NEGATIVE: Final = Threshold(min=0)
POSITIVE: Final = Threshold(min=0, min_open=True)


@dataclass
class Ctx:
    """The global flags, wherever they were given, and argv (for errors raised before it was parsed)."""

    json: bool = False
    quiet: bool = False
    debug: bool = False
    argv: tuple[str, ...] = ()

    @property
    def json_errors(self) -> bool:
        """`--json` was given — also when a usage error stopped click before it parsed the flag."""
        args = self.argv[: self.argv.index("--")] if "--" in self.argv else self.argv
        return self.json or "--json" in args


def _set_flag(context: click.Context, param: click.Parameter, value: bool) -> None:
    if value and param.name:
        setattr(context.ensure_object(Ctx), param.name, True)


def global_options() -> list[click.Parameter]:
    """Fresh `--json`, `-q/--quiet` and `--debug` options: the group's copy, or one command's."""

    def flag(*decls: str, text: str) -> click.Option:
        return click.Option(decls, is_flag=True, expose_value=False, callback=_set_flag, help=text)

    return [
        flag("--json", text='Output as JSON (an error as {"error": ..., "exit_code": N}).'),
        flag("-q", "--quiet", text="Suppress stdout (errors still go to stderr; --json still prints)."),
        flag("--debug", text="Show a traceback on errors."),
    ]


def ctx() -> Ctx:
    obj = click.get_current_context().find_object(Ctx)
    return obj if obj is not None else Ctx()


def wants_json() -> bool:
    return ctx().json


def emit(s: str) -> None:
    """Human output: suppressed by --quiet (JSON output is never suppressed)."""
    if not ctx().quiet:
        click.echo(s, nl=False)


def show(result: R, doc: Callable[[R], dict[str, Any]], render: Callable[[R], str]) -> None:
    """Print a result as JSON (`--json`) or as text."""
    if wants_json():
        click.echo(jsonr.dumps(doc(result)))
    else:
        emit(render(result))


def given_options() -> dict[str, str]:
    """The options the user gave the running command (parameter name → its flag), defaults left out: for
    the checks that refuse a flag the mode a command runs in would ignore."""
    context = click.get_current_context()
    return {
        p.name: p.opts[0]
        for p in context.command.params
        if p.name and context.get_parameter_source(p.name) is not ParameterSource.DEFAULT
    }


def exit_diverged() -> None:
    sys.exit(int(ExitCode.DIVERGED))


class Progress:
    """`layer 3/30` on stderr, on a terminal (or `force`: --progress) and never with --quiet or --json."""

    def __init__(self, total: int, label: str, force: bool = False) -> None:
        c = ctx()
        self.on = (force or sys.stderr.isatty()) and not c.quiet and not c.json
        self.total, self.label = total, label

    def __call__(self, i: int) -> None:
        if self.on:
            end = "\n" if i + 1 == self.total else ""
            click.echo(f"\r{self.label} {i + 1}/{self.total}{end}", err=True, nl=False)


def _report(message: str, code: int, as_json: bool) -> None:
    """The one error format: a line on stderr and, with --json, a JSON object on stdout."""
    if as_json:
        click.echo(jsonr.dumps({"error": message, "exit_code": code}), nl=False)
    click.echo(f"error: {message}", err=True)


class UsageLine(click.ClickException):
    """A click usage error shown like every other error (click itself prints Usage:/Try/Error: lines)."""

    exit_code = int(ExitCode.USAGE)

    def __init__(self, e: click.UsageError) -> None:
        hint = f" Try '{e.ctx.command_path} --help'." if e.ctx is not None else ""
        super().__init__(" ".join(e.format_message().split()) + hint)
        obj = e.ctx.find_object(Ctx) if e.ctx is not None else None
        self.as_json = obj is not None and obj.json_errors

    def show(self, file: IO[Any] | None = None) -> None:
        _report(self.message, self.exit_code, self.as_json)


class AprCommand(click.Command):
    """A command that also takes the global flags: `apr diff a b --json` is `apr --json diff a b`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(global_options())


# Which module defines each command. A command's module (and the library behind it) is imported only when
# the command is named, so `apr trace` does not pay for the differ, the converters and the HTML report.
COMMANDS: Final = {
    "stages": "apr.cli.tracing",
    "trace": "apr.cli.tracing",
    "diff": "apr.cli.comparing",
    "bisect": "apr.cli.comparing",
    "inspect": "apr.cli.models",
    "import": "apr.cli.models",
    "convert": "apr.cli.models",
    "export": "apr.cli.models",
}


class AprGroup(click.Group):
    """Maps every error to `error: <message>` + exit code, in one place; loads commands on demand."""

    command_class = AprCommand

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(global_options())

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(COMMANDS) | set(self.commands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = COMMANDS.get(cmd_name)
        if cmd_name not in self.commands and module is not None:
            importlib.import_module(module)  # its @cli.command decorators register it
        return super().get_command(ctx, cmd_name)

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        extra.setdefault("obj", Ctx(argv=tuple(args)))
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise  # bare `apr`: click prints the help
        except click.UsageError as e:
            raise UsageLine(e) from None

    def invoke(self, context: click.Context) -> Any:
        try:
            return super().invoke(context)
        except AprError as e:
            _fail(context, str(e), int(e.exit_code))
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            _fail(context, f"{e.strerror or e}{where}", int(ExitCode.IO))
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            raise UsageLine(e) from None
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            _fail(context, "interrupted", INTERRUPTED)
        except Exception as e:
            _fail(context, f"internal error: {type(e).__name__}: {e} (re-run with --debug)", INTERNAL_ERROR)


def _fail(context: click.Context, message: str, code: int) -> NoReturn:
    obj = context.find_object(Ctx) or Ctx()
    if obj.debug:
        traceback.print_exc()
    _report(message, code, obj.json_errors)
    context.exit(code)


@click.group(PROG, cls=AprGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name=PROG)
def cli() -> None:
    """Trace an LLM's forward pass stage by stage and find where two runs part ways.

    \b
    Global flags (--json, -q, --debug) go before the command or after it.
    Exit codes: 0 ok · 1 divergence found (diff --check, bisect) · 2 usage error · 3 file not found
    · 4 invalid file format · 5 validation failed · 6 model load failed · 7 I/O error
    · 8 inference failed · 9 optional extra not installed · 70 internal error
    · 130 interrupted (SIGINT, SIGTERM)
    Environment: APR_CACHE — where models' sha256 are cached (default ~/.cache/apr; "off": hash every time)
    """
