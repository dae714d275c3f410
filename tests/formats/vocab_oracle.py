"""The checks every vocab-GGUF oracle test makes against llama-cpp-python (`Llama(vocab_only=True)`):
the same ids for every text, the same pieces on decode, and the same ids again after the spec went through
an `.apr`'s tokenizer keys (so the `.apr` carries everything the tokenizer needs)."""

from __future__ import annotations

import ctypes
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apr.formats.aprmeta import tokenizer_from_metadata
from apr.formats.aprwrite import tokenizer_keys
from apr.formats.base import TokenizerSpec
from apr.formats.gguf import open_gguf
from apr.formats.tokenizer import Tokenizer, build_tokenizer


def finish(w: Any) -> None:
    """Write out a vocab-only `gguf.GGUFWriter` (header, metadata, no tensors) and close it."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@dataclass(frozen=True)
class Compared:
    spec: TokenizerSpec  # read from the GGUF by apr
    tok: Tokenizer  # apr's tokenizer of it
    llm: Any  # llama-cpp-python's `Llama(vocab_only=True)` of it
    want: dict[str, list[int]]  # llama.cpp's ids of each text


def compare_with_llama(path: Path, texts: Iterable[str]) -> Compared:
    """apr's tokenizer of the vocab GGUF at `path` against llama.cpp's: exact ids for every text asserted."""
    import llama_cpp as llama_cpp

    spec = open_gguf(path).tokenizer_spec()
    assert spec is not None
    tok = build_tokenizer(spec)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    want = llama_ids(llm, texts)
    assert_ids(tok, want)
    return Compared(spec, tok, llm, want)


def llama_ids(llm: Any, texts: Iterable[str]) -> dict[str, list[int]]:
    """llama_tokenize(text, add_special=true, parse_special=true) of each text."""
    return {t: list(llm.tokenize(t.encode(), add_bos=True, special=True)) for t in texts}


def assert_ids(tok: Tokenizer, want: dict[str, list[int]]) -> None:
    """Exact ids (tolerance: none) for every text."""
    bad = [t for t in want if tok.encode(t) != want[t]]
    assert not bad, f"{len(bad)} of {len(want)} differ, first: {bad[0]!r}"


def token_pieces(llm: Any, ids: list[int]) -> bytes:
    """llama_token_to_piece(special=true) of each id, concatenated: `Llama.detokenize` is not that (its
    32-byte buffer drops longer pieces, and it drops a space after BOS)."""
    import llama_cpp as llama_cpp

    size = 4096
    buf = (ctypes.c_char * size)()
    out = b""
    for i in ids:
        n = llama_cpp.llama_token_to_piece(llm._model.vocab, llama_cpp.llama_token(i), buf, size, 0, True)
        assert 0 <= n <= size
        out += bytes(buf[:n])
    return out


def assert_pieces(tok: Tokenizer, llm: Any, encoded: list[list[int]]) -> None:
    """decode = llama.cpp's pieces, concatenated (bytes that are not UTF-8 as U+FFFD)."""
    assert [tok.decode(i) for i in encoded] == [
        token_pieces(llm, i).decode(errors="replace") for i in encoded
    ]


def assert_apr_round_trip(spec: TokenizerSpec, want: dict[str, list[int]]) -> None:
    """The spec written as an `.apr`'s tokenizer keys (JSON) and read back still gives llama.cpp's ids."""
    keys = {k: v for k, v in tokenizer_keys(spec).items() if v is not None}
    back = tokenizer_from_metadata(json.loads(json.dumps(keys)), "x.apr")
    assert back is not None
    assert_ids(build_tokenizer(back), want)
