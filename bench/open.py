"""Open-time benchmark: apr's GGUF reader and tokenizer builder vs gguf-py's GGUFReader.

    .venv/bin/python bench/open.py [MODEL.gguf] [--runs 5]

Without a path it uses the SmolLM2-135M Q4_1 test fixture. Each row is the median of `runs` timings
in one process (the file stays in the page cache, so this measures parsing, not the disk). `measure`
returns the rows for use from Python.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apr.formats.gguf import open_gguf
from apr.formats.tokenizer import build_tokenizer


@dataclass(frozen=True)
class Row:
    what: str
    apr_s: float
    gguf_s: float

    @property
    def speedup(self) -> float:
        return self.gguf_s / self.apr_s


def _median(fn: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _apr_tokenizer(path: Path) -> Any:
    spec = open_gguf(path).tokenizer_spec()
    assert spec is not None
    return build_tokenizer(spec)


def _gguf_py_tokenizer(path: Path) -> Any:
    """oracles.md §2's recipe: GGUFReader, then `tokenizers` objects built from Python lists."""
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    r = GGUFReader(path)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in r.fields["tokenizer.ggml.merges"].contents()]
    types = r.fields["tokenizer.ggml.token_type"].contents()
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=True) if k == 3]
    )
    return tok


def measure(path: Path, runs: int = 5) -> list[Row]:
    """Median seconds for: opening (metadata + tensor index) and open + tokenizer build."""
    from gguf import GGUFReader

    return [
        Row(
            "open: metadata + tensor index",
            _median(lambda: open_gguf(path).close(), runs),
            _median(lambda: GGUFReader(path), runs),
        ),
        Row(
            "open + build the tokenizer",
            _median(lambda: _apr_tokenizer(path), runs),
            _median(lambda: _gguf_py_tokenizer(path), runs),
        ),
    ]


def render(rows: list[Row], path: Path) -> str:
    lines = [
        f"{path.name}",
        f"| {'what':<30} | {'apr (s)':>8} | {'gguf-py (s)':>11} | {'speed-up':>8} |",
        f"|{'-' * 32}|{'-' * 9}:|{'-' * 12}:|{'-' * 9}:|",
    ]
    lines += [f"| {r.what:<30} | {r.apr_s:8.3f} | {r.gguf_s:11.3f} | {r.speedup:7.1f}x |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", type=Path, help="a GGUF file (default: SmolLM2 fixture)")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    path = args.path
    if path is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.fixtures import models

        path = models.smollm2_gguf()
    print(render(measure(path, args.runs), path))


if __name__ == "__main__":
    main()
