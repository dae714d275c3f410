"""The `apr` command line: a thin layer over the library (see cli/app.py for the shared parts).

Exit codes: 0 ok / within tolerance · 1 divergence found (`diff --check`, `bisect`) · 2 usage error ·
3 file not found · 4 invalid file format · 5 validation failed · 6 model load failed · 7 I/O error ·
8 inference failed · 9 optional extra not installed · 70 internal error (a bug: please report it) ·
130 interrupted (SIGINT, SIGTERM).
"""

from __future__ import annotations

from apr.cli.app import cli

__all__ = ["cli", "main"]


def main() -> None:
    cli(prog_name="apr")
