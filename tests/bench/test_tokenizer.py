"""bench/tokenizer.py: its synthetic vocabs are what they say (sizes, types, merges of existing tokens) and
build tokenizers that round-trip text; bench/run.py renders its timings as rows of its table. No test
asserts a time."""

from __future__ import annotations

from types import ModuleType

import pytest

from apr.formats.tokenizer import build_tokenizer
from tests.bench import load_bench


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench("tokenizer")


def test_synthetic_bpe_vocab(bench: ModuleType) -> None:
    spec = bench.bpe_spec(3000, seed=1)
    assert len(spec.tokens) == len(set(spec.tokens)) == 3000 and len(spec.merges) == 3000 - 256 - 3
    vocab = set(spec.tokens)
    assert all(a in vocab and b in vocab and a + b in vocab for a, b in (m.split(" ") for m in spec.merges))
    tok = build_tokenizer(spec)
    text = "The quick brown fox, 12 + 30 = 42. <|im_end|>"
    assert tok.decode(tok.encode(text)) == text and tok.encode("<|im_end|>") == [2999]


def test_synthetic_spm_vocab(bench: ModuleType) -> None:
    spec = bench.spm_spec(3000, seed=1)
    assert len(spec.tokens) == len(set(spec.tokens)) == len(spec.scores) == 3000
    assert spec.tokens[:4] == ["<unk>", "<s>", "</s>", "<0x00>"] and spec.token_types[:4] == [2, 3, 3, 6]
    tok = build_tokenizer(spec)
    ids = tok.encode("Grüße, world")
    assert ids[0] == 1 and tok.decode(ids[1:]) == "Grüße, world"


def test_timings_are_rows_of_the_bench_table(bench: ModuleType) -> None:
    timings = bench.measure(1000, runs=1)
    assert [t.kind for t in timings] == ["BPE", "SPM"] and all(t.seconds > 0 for t in timings)
    table = load_bench("run").render(load_bench("run").tokenizer_rows(timings)).splitlines()
    assert table[0].startswith("| what ") and len(table) == 4
    assert table[2].startswith("| build tokenizer: 1k-token BPE (synthetic) | s    | ")
    assert table[2].endswith(" | —         |       | ≤ 0.3 s | yes |")


def test_encode_seconds(bench: ModuleType) -> None:
    assert bench.encode_seconds(bench.bpe_spec(1000, seed=1), n_words=50) > 0
