"""HybridDNA vocabs (tokenizer.ggml.model "hybriddna"): apr's ids equal llama.cpp's
(`Llama(vocab_only=True).tokenize(text, add_bos=True, special=True)`), exactly, and decode equals
llama.cpp's token_to_piece.

The vocab is the byte-level BPE of the pre-tokenizer tests, then "<dna>", "</dna>", "<oov>" and every
6-mer of ACGT with the marker U+E000 after it (as llama.cpp's loader expects them); the DNA tags are
normal tokens (the session cuts the k-mers) or control tokens (cut out first: no k-mers at all).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import gguf as gguf
import pytest

from tests.formats.test_tokenizer_pre import SPECIALS, TEXTS
from tests.formats.test_tokenizer_pre import bpe as bpe  # the byte-level BPE fixture
from tests.formats.vocab_oracle import assert_apr_round_trip, assert_pieces, compare_with_llama, finish

DNA = ["<dna>", "</dna>", "<oov>"]
KMERS = ["".join(k) + "\ue000" for k in itertools.product("ACGT", repeat=6)]
DNA_TEXTS = [
    "<dna>ACGTACGTACGT</dna>", "<dna>acgtac</dna> and text", "see <dna>ACGTA</dna>!", "<dna></dna>",
    "<dna>ACGTNN ACGT\nAC</dna>", "<dna>AÜCGTACGT</dna>", "x<dna>unclosed ACGTAC",
    "<dna>AC</dna><dna>G</dna>", "</dna><dna>TTTTTTT", "<dna>ACGTAC\ue000</dna>",
    "<|im_start|><dna>GATTACA<|im_end|>CCC</dna>",
]  # fmt: skip


def write_dna_vocab(path: Path, tokens: list[str], merges: list[str], tags_type: int) -> Path:
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny dna")
    w.add_uint32("llama.context_length", 64)
    w.add_tokenizer_model("hybriddna")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3 if t in SPECIALS else tags_type if t in DNA else 1 for t in tokens])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(True)
    finish(w)
    return path


@pytest.mark.oracle
@pytest.mark.parametrize("tags_type", [1, 3])
def test_equals_llama_cpp(tags_type: int, bpe: tuple[list[str], list[str]], tmp_path: Path) -> None:
    """Exact ids (tolerance: none), BOS included; decode byte for byte."""
    tokens, merges = bpe
    path = write_dna_vocab(tmp_path / "dna.gguf", [*tokens, *DNA, *KMERS], merges, tags_type)
    c = compare_with_llama(path, [*TEXTS, *DNA_TEXTS])
    first_kmer = len(tokens) + len(DNA)
    assert any(i >= first_kmer for i in c.want[DNA_TEXTS[0]]) == (tags_type == 1)
    assert_pieces(c.tok, c.llm, list(c.want.values()))
    assert_apr_round_trip(c.spec, c.want)
