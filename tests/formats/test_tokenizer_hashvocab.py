"""llama.cpp's "test" vocab type (tokenizer.ggml.model "test": each 5 bytes of text hashed to an id):
apr's ids equal llama.cpp's (`Llama(vocab_only=True).tokenize(text, add_bos=True, special=True)`) and
decode equals its token_to_piece (the id in hex), exactly, on generated text."""

from __future__ import annotations

from pathlib import Path

import gguf as gguf
import pytest

from apr.formats.gguf import open_gguf
from apr.formats.tokenizer import build_tokenizer
from tests.formats.test_tokenizer_pre import SPECIALS, TEXTS
from tests.formats.vocab_oracle import token_pieces


@pytest.mark.oracle
@pytest.mark.parametrize("n_vocab", [997, 50_000])
def test_equals_llama_cpp(n_vocab: int, tmp_path: Path) -> None:
    import llama_cpp as llama_cpp

    tokens = [*SPECIALS, *(f"t{i}" for i in range(n_vocab - len(SPECIALS)))]
    w = gguf.GGUFWriter(tmp_path / "test.gguf", "llama")
    w.add_uint32("llama.context_length", 64)
    w.add_tokenizer_model("test")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_add_bos_token(True)  # llama.cpp adds nothing for this type all the same
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    spec = open_gguf(tmp_path / "test.gguf").tokenizer_spec()
    assert spec is not None
    tok = build_tokenizer(spec)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "test.gguf"), vocab_only=True, verbose=False)
    want = {t: list(llm.tokenize(t.encode(), add_bos=True, special=True)) for t in TEXTS}
    bad = [t for t in TEXTS if tok.encode(t) != want[t]]
    assert not bad, f"{len(bad)} of {len(TEXTS)} differ, first: {bad[0]!r}"
    assert [tok.decode(i) for i in want.values()] == [token_pieces(llm, i).decode() for i in want.values()]
