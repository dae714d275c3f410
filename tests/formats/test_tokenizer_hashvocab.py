"""llama.cpp's "test" vocab type (tokenizer.ggml.model "test": each 5 bytes of text hashed to an id):
apr's ids equal llama.cpp's (`Llama(vocab_only=True).tokenize(text, add_bos=True, special=True)`) and
decode equals its token_to_piece (the id in hex), exactly, on generated text."""

from __future__ import annotations

from pathlib import Path

import gguf as gguf
import pytest

from tests.formats.test_tokenizer_pre import SPECIALS, TEXTS
from tests.formats.vocab_oracle import compare_with_llama, finish, token_pieces


@pytest.mark.oracle
@pytest.mark.parametrize("n_vocab", [997, 50_000])
def test_equals_llama_cpp(n_vocab: int, tmp_path: Path) -> None:
    tokens = [*SPECIALS, *(f"t{i}" for i in range(n_vocab - len(SPECIALS)))]
    w = gguf.GGUFWriter(tmp_path / "test.gguf", "llama")
    w.add_uint32("llama.context_length", 64)
    w.add_tokenizer_model("test")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_add_bos_token(True)  # llama.cpp adds nothing for this type all the same
    finish(w)
    c = compare_with_llama(tmp_path / "test.gguf", TEXTS)
    encoded = list(c.want.values())
    assert [c.tok.decode(i) for i in encoded] == [token_pieces(c.llm, i).decode() for i in encoded]
