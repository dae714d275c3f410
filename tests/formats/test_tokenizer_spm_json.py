"""The tokenizer.json `apr export` writes for a SentencePiece GGUF vocab (apr.formats.tokenizer_spm_json):
on vocabs sentencepiece trains, `tokenizers` encodes and decodes with it exactly as llama.cpp does (the
oracle: `Llama(vocab_only=True)` on the same GGUF); on vocabs whose equal scores set merges against each
other, the export's check finds the texts where the two part ways and writes no tokenizer.json."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from apr.convert.export import JSON_BUILDERS
from apr.errors import FormatError
from apr.formats import tokenizer_spm_json as spm_json
from apr.formats.base import TokenizerSpec
from apr.formats.gguf import open_gguf
from apr.formats.tokenizer import build_tokenizer
from apr.formats.tokenizer_probe import PROBES
from tests.formats.test_tokenizer_spm import (  # noqa: F401  (sp, trained: the module's fixtures)
    Pair,
    Vocab,
    corpus,
    pair,
    random_vocab,
    sp,
    trained,
    write_vocab,
)

pytestmark = pytest.mark.oracle


def spec_of(p: Pair) -> TokenizerSpec:
    spec = open_gguf(p.path).tokenizer_spec()
    assert spec is not None
    return spec


def test_trained_vocab_encodes_and_decodes_as_llama_cpp(trained: Pair) -> None:  # noqa: F811 (the fixture)
    spec = spec_of(trained)
    built = spm_json.build(spec)
    assert built.ambiguous == 0 and built.tie_texts == () and built.merges > 400
    texts = [t for _, t in PROBES] + corpus(600, seed=11) + ["<s>Hi <s> end </s>", "<|im_start|>x<|im_end|>"]
    texts += ["", " ", "   ", "\n\n\t x", "a  b", "<unk>", "▁<PRE> x"]
    want = [trained.theirs(t) for t in texts]
    assert [built.backend.encode(t).ids for t in texts] == want  # exact ids, every text
    # control and unknown tokens are special (skipped by decode(skip_special_tokens=True)), user-defined
    # ones text, as llama.cpp prints them whatever its flags
    added = {t["content"]: t["special"] for t in json.loads(built.backend.to_str())["added_tokens"]}
    assert added["</s>"] and added["<unk>"] and not added["<tool>"] and not added["<|im_start|>"]
    shown = built.backend.decode(trained.theirs("a <tool> b</s>"), skip_special_tokens=True)
    assert "<tool>" in shown and "</s>" not in shown and "<s>" not in shown, shown
    # llama_detokenize(remove_special=false, unparse_special=true): the pieces, byte tokens as bytes
    assert [built.backend.decode(ids, skip_special_tokens=False) for ids in want[:200]] == [
        trained.detokenize(ids) for ids in want[:200]
    ]


@pytest.mark.parametrize("seed", range(3))
def test_tied_scores_are_found_and_the_export_writes_no_tokenizer_json(seed: int, tmp_path: Path) -> None:
    """Random vocabs with scores from {-1..-4}: merges of one score meet, llama.cpp goes leftmost, BPE by
    rank. Some random text really tokenizes differently (so the check has something to find), the tie texts
    find it, and the export refuses with a note naming the probe."""
    rng = random.Random(seed)
    v = random_vocab(rng, "ab▁cé日", 120, [])
    p = pair(write_vocab(tmp_path / "tied.gguf", v))
    spec = spec_of(p)
    built = spm_json.build(spec)
    assert built.ambiguous > 0 and built.tie_texts
    texts = ["".join(rng.choice("ab cé日") for _ in range(rng.randint(1, 30))) for _ in range(300)]
    assert any(built.backend.encode(t).ids != p.theirs(t) for t in texts)
    assert any(built.backend.encode(t).ids != p.theirs(t) for t in built.tie_texts)
    notes: list[str] = []
    assert JSON_BUILDERS["llama"](spec, build_tokenizer(spec), notes) is None
    assert len(notes) == 1 and notes[0].startswith("tokenizer not exported: a tokenizer.json would encode")


def test_a_vocab_without_byte_tokens_is_refused_by_name() -> None:
    v = Vocab(["<unk>", "<s>", "</s>", "a", "b", "ab"], [0.0, 0.0, 0.0, -1.0, -2.0, -3.0], [2, 3, 3, 1, 1, 1])
    spec = TokenizerSpec(model="llama", tokens=v.tokens, scores=v.scores, token_types=v.types)
    with pytest.raises(FormatError, match=r"no byte token <0x00> for the byte fallback"):
        spm_json.build(spec)
    notes: list[str] = []
    assert JSON_BUILDERS["llama"](spec, build_tokenizer(spec), notes) is None
    assert notes == ["tokenizer not exported: no byte token <0x00> for the byte fallback"]


def test_overlapping_ties_are_counted_once_each() -> None:
    """ "aaa" splits as a|aa and aa|a: one score, and aa|a can take the "aa" a|aa would (the pair of
    `_overlapping`); "ab" and "ba" of equal score meet over "b" and over "a"."""
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    tokens = ["<unk>", *bytes_, "a", "b", "aa", "aaa", "ab", "ba"]
    scores = [0.0] * 257 + [-1.0, -2.0, -3.0, -4.0, -5.0, -5.0]
    types = [2, *[6] * 256, 1, 1, 1, 1, 1, 1]
    spec = TokenizerSpec(model="llama", tokens=tokens, scores=scores, token_types=types)
    built = spm_json.build(spec)
    assert built.ambiguous == 4  # a|aa, aa|a, a|b, b|a
    assert set(built.tie_texts) == {"aaaa", "aaaaa", "aba", "bab"}  # a·aa·a, aa·a·aa, a·b·a, b·a·b
