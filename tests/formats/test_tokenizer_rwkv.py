"""RWKV world vocabs (tokenizer.ggml.model "rwkv"): apr's ids equal llama.cpp's
(`Llama(vocab_only=True).tokenize(text, add_bos=True, special=True)`), exactly, on generated text, and
decode equals llama.cpp's token_to_piece.

The vocab is written as llama.cpp's converter writes one (conversion/base.py `_set_vocab_rwkv_world`:
"<s>" CONTROL, then each token's bytes as `repr(bytes)[2:-1]`, then "[PAD<i>]" UNUSED): every single
byte but two, byte strings cut from the generated corpus (partial UTF-8 characters, quotes, backslashes
and control bytes included), and the special tokens of the BPE tests as CONTROL tokens.
"""

from __future__ import annotations

import random
from pathlib import Path

import gguf as gguf
import pytest

from apr.errors import FormatError
from apr.formats.tokenizer_rwkv import unescape
from tests.formats.test_tokenizer_pre import SPECIALS, TEXTS
from tests.formats.test_tokenizer_spm import corpus
from tests.formats.vocab_oracle import assert_apr_round_trip, assert_pieces, compare_with_llama, finish

NO_TOKEN = (0x01, 0x02)  # no token starts with these bytes: the unknown token, when there is one
MORE = ["\x01x\x02", "\\x41 \\n \\\\ '\"", "<s>hi<s>", "[PAD5] [PAD6]", "x<|im_end|>y", "\x7f\x80"]


def rwkv_tokens(n: int = 1500, seed: int = 4) -> list[str]:
    rng = random.Random(seed)
    chunks: dict[bytes, None] = dict.fromkeys(bytes([b]) for b in range(256) if b not in NO_TOKEN)
    texts = [t.encode() for t in corpus(400, seed=seed)] + [b"\\x41 \\n '\" \\\\ \x7f\x00\x03"]
    while len(chunks) < n:
        t = rng.choice(texts)
        start = rng.randrange(len(t))
        piece = t[start : start + rng.randint(2, 9)]
        if piece[:1] not in (b"\x01", b"\x02"):
            chunks[piece] = None
    tokens = ["<s>", *(repr(b)[2:-1] for b in chunks)]
    return tokens + SPECIALS[1:] + [f"[PAD{i}]" for i in range(len(tokens) + 5, len(tokens) + 8)]


def write_rwkv_vocab(path: Path, tokens: list[str], unk: int | None) -> Path:
    w = gguf.GGUFWriter(path, "rwkv6")
    w.add_name("tiny rwkv")
    w.add_uint32("rwkv6.context_length", 64)
    w.add_tokenizer_model("rwkv")
    w.add_token_list(tokens)
    types = [3 if t == "<s>" or t in SPECIALS else 5 if t.startswith("[PAD") else 1 for t in tokens]
    w.add_token_types(types)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(True)  # llama.cpp adds nothing for RWKV all the same
    if unk is not None:
        w.add_unk_token_id(unk)
    finish(w)
    return path


def test_unescape_is_the_converters_inverse() -> None:
    """The token texts the converter writes are Python bytes literals: `unescape` reads them as Python."""
    import ast

    tokens = rwkv_tokens()
    assert all(unescape(t) == ast.literal_eval(f"b'{t}'") for t in tokens[1:] if "'" not in t)
    assert unescape("\\x4a\\t\\q\\\\") == b"J\tq\\"


@pytest.mark.oracle
@pytest.mark.parametrize("unk", [7, None])
def test_equals_llama_cpp(unk: int | None, tmp_path: Path) -> None:
    """Exact ids (tolerance: none), nothing added; decode byte for byte."""
    path = write_rwkv_vocab(tmp_path / "rwkv.gguf", rwkv_tokens(), unk)
    # without an unknown token llama.cpp emits -1 for a byte no token starts with: apr refuses that text
    texts = [t for t in [*TEXTS, *MORE] if unk is not None or not any(chr(b) in t for b in NO_TOKEN)]
    c = compare_with_llama(path, texts)
    assert c.want["<s>hi<s>"][0] == 0 and c.want["x<|im_end|>y"][0] != 0
    assert_pieces(c.tok, c.llm, list(c.want.values()))
    assert_apr_round_trip(c.spec, c.want)
    if unk is None:
        with pytest.raises(FormatError, match=r"^the RWKV vocab has no token for byte 0x01 and no unknown"):
            c.tok.encode("a\x01")
