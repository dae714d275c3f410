"""PLaMo-2 vocabs (tokenizer.ggml.model "plamo2"): apr's ids equal llama.cpp's
(`Llama(vocab_only=True).tokenize(text, add_bos=True, special=True)`), exactly, on generated text, and
decode equals llama.cpp's token_to_piece.

The vocab is written as llama.cpp's converter writes one (conversion/base.py `_set_vocab_plamo`):
<|plamo:*|> CONTROL tokens (unk UNKNOWN), the 256 <0xXX> BYTE tokens, then pieces cut from the generated
corpus (code points, spaces as they are) with scores, some tied, some not finite (no piece repeated:
llama.cpp refuses a vocab with a repeated token).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import gguf as gguf
import pytest

from apr.errors import FormatError
from apr.formats.base import TokenizerSpec
from apr.formats.tokenizer import build_tokenizer
from tests.formats.test_tokenizer_pre import TEXTS
from tests.formats.test_tokenizer_spm import corpus
from tests.formats.vocab_oracle import assert_apr_round_trip, assert_pieces, compare_with_llama, finish

SPECIALS = ["<|plamo:unk|>", "<|plamo:bos|>", "<|plamo:eos|>", "<|plamo:pad|>", "<|plamo:op|>"]
MORE = ["\ufeffBOM first", "x\ufeffy", "<|plamo:bos|>\ufeffafter", "<0x41> <|plamo:op|>", "the the the"]


def plamo2_vocab(n: int = 1500, seed: int = 5) -> tuple[list[str], list[float], list[int]]:
    rng = random.Random(seed)
    tokens = [*SPECIALS, *(f"<0x{b:02X}>" for b in range(256))]
    types = [2, 3, 3, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    texts = corpus(400, seed=seed)
    pieces: dict[str, None] = {}
    while len(pieces) < n:
        t = rng.choice(texts)
        start = rng.randrange(len(t))
        pieces[t[start : start + rng.choice([1, 1, 2, 2, 3, 4, 5, 8])]] = None
    for p in pieces:
        tokens.append(p)
        types.append(1)
        scores.append(
            rng.choice([-1.0, -2.5, -3.00005, -0.00015]) if rng.random() < 0.2 else -rng.uniform(0, 12)
        )
    for i in rng.sample(range(261, len(tokens)), 8):
        scores[i] = rng.choice([-math.inf, math.nan])
    return tokens, scores, types


def write_plamo2_vocab(path: Path, tokens: list[str], scores: list[float], types: list[int]) -> Path:
    w = gguf.GGUFWriter(path, "plamo2")
    w.add_name("tiny plamo2")
    w.add_uint32("plamo2.context_length", 64)
    w.add_tokenizer_model("plamo2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)  # llama.cpp adds nothing for PLaMo-2 all the same
    w.add_add_space_prefix(False)
    finish(w)
    return path


@pytest.mark.oracle
def test_equals_llama_cpp(tmp_path: Path) -> None:
    """Exact ids (tolerance: none), nothing added; decode byte for byte."""
    path = write_plamo2_vocab(tmp_path / "plamo2.gguf", *plamo2_vocab())
    c = compare_with_llama(path, [*TEXTS, *MORE])
    assert c.want["<|plamo:bos|>\ufeffafter"][0] == 1
    assert any(5 <= i < 261 for ids in c.want.values() for i in ids)  # byte tokens are used
    assert_pieces(c.tok, c.llm, list(c.want.values()))
    assert_apr_round_trip(c.spec, c.want)


def test_missing_byte_token_is_an_error() -> None:
    """llama.cpp refuses the vocab ("Byte token for <0x..> is not set")."""
    tokens, scores, types = plamo2_vocab(50)
    keep = [*range(100), *range(300, len(tokens))]  # <0x5F> (id 100) onwards left out
    spec = TokenizerSpec(model="plamo2", tokens=[tokens[i] for i in keep], scores=[scores[i] for i in keep],
                         token_types=[types[i] for i in keep])  # fmt: skip
    with pytest.raises(FormatError, match=r"^the PLaMo-2 vocab has no byte token <0x5F>"):
        build_tokenizer(spec)
