"""docs/cli.md is the CLI's own --help output (regenerate with `make docs`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_docs_match_help_output() -> None:
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (ROOT / "docs" / "cli.md").read_text() == gen.render(), "docs/cli.md is stale: run `make docs`"


def test_every_command_has_an_example() -> None:
    text = (ROOT / "docs" / "cli.md").read_text()
    for section in text.split("\n## apr ")[1:]:
        assert "Example:" in section, section.splitlines()[0]
