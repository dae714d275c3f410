"""Print docs/cli.md: the `--help` of `apr` and of every command (tests/test_docs.py keeps it in sync).

python scripts/gen_cli_docs.py > docs/cli.md
"""

from __future__ import annotations

import click
from click.testing import CliRunner

from apr.cli import cli

WIDTH = 100


def help_text(args: list[str]) -> str:
    result = CliRunner().invoke(cli, [*args, "--help"], terminal_width=WIDTH, prog_name="apr")
    return result.output.rstrip() + "\n"


def render() -> str:
    ctx = click.Context(cli)
    parts = ["# apr command line\n", "Generated from `--help` by `scripts/gen_cli_docs.py`; do not edit.\n"]
    parts += ["## apr\n", "```text", help_text([]), "```\n"]
    for name in cli.list_commands(ctx):
        parts += [f"## apr {name}\n", "```text", help_text([name]), "```\n"]
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
