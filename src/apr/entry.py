"""The `apr` console script and `python -m apr`: the CLI, with a Ctrl-C that lands while the CLI's modules
are still being imported (before any command runs) reported as every other interrupt is — one
`error: interrupted` line and exit 130 — instead of a Python traceback."""

from __future__ import annotations

import os
import sys

INTERRUPTED = 130  # as apr.cli.app.INTERRUPTED; this module must not import the CLI before it can fail


def run() -> None:
    try:
        from apr.cli import main
    except KeyboardInterrupt:
        interrupted()
    try:
        main()
    except KeyboardInterrupt:  # outside a command's invoke (which reports its own)
        interrupted()


def interrupted() -> None:
    try:
        os.write(2, b"error: interrupted\n")
    finally:
        sys.exit(INTERRUPTED)
