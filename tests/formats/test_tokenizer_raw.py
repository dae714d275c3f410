"""BPE on raw UTF-8 (tokenizer.ggml.pre gemma4, granite-embed-multi-311m, sarvam-moe, whitespace;
tokenizer.ggml.model gemma4): apr's ids equal llama.cpp's (`Llama(vocab_only=True).tokenize(text,
add_bos=True, special=True)`), exactly, on generated text; decode equals llama.cpp's token_to_piece.

The vocab is a Gemma-style BPE trained here with `tokenizers` on the generated corpus with spaces as "▁":
control special tokens, <0xXX> byte tokens (a few left out, so that some bytes are dropped), the learned
tokens, a newline-run token no merge makes, and merges whose result or operand is not a token.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import gguf as gguf
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from apr.errors import FormatError
from apr.formats.base import TokenizerSpec
from apr.formats.gguf import open_gguf
from apr.formats.tokenizer import build_tokenizer
from tests.formats.test_tokenizer_pre import SPECIALS, TEXTS, write_bpe_vocab
from tests.formats.test_tokenizer_pre import bpe as bpe  # the byte-level BPE fixture
from tests.formats.test_tokenizer_spm import corpus
from tests.formats.vocab_oracle import (
    assert_apr_round_trip,
    assert_ids,
    assert_pieces,
    compare_with_llama,
    finish,
    llama_ids,
)

ESC = "\u2581"
MISSING_BYTES = (0x80, 0x81, 0xF0, 0x0B)  # no <0xXX> token: llama.cpp drops these bytes
EXTRA_TOKENS = ["\n\n\n\n", "\n\n\n\n\n\n"]  # newline runs no merge makes (Gemma 4's rule finds them)
MORE = [
    "\n\n\n\n", "a\n\n\n\nb", "\n\n\n\n\n\n", "\n\n\n", "\x0b\x0c\x1c\x1d\x1e\x1f\x85 x",
    "\u00e9\u00e8 \u0080\u00f0\U0001f600", "fox  dog", "  lead", "trail  ", "▁already▁escaped",
    "<|im_start|>user\nthe quick<|im_end|>\n", "x<|endoftext|>y <mask> z", "\t\u3000\u2028x\u00a0y",
]  # fmt: skip
BOS = 0


@pytest.fixture(scope="module")
def raw_bpe() -> tuple[list[str], list[str]]:
    """Tokens (in id order) and merges of a BPE over characters, spaces as "▁"."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(r"[^\n]+|\n+"), "isolated")
    trainer = trainers.BpeTrainer(vocab_size=1500, limit_alphabet=150, show_progress=False)
    tok.train_from_iterator((t.replace(" ", ESC) for t in corpus(2000, seed=3)), trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    learned = sorted(vocab, key=vocab.__getitem__)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256) if b not in MISSING_BYTES]
    tokens = [*SPECIALS, *byte_tokens, *learned, *EXTRA_TOKENS]
    # a merge whose result is not a token, and one of an operand that is not: llama.cpp merges anyway
    merges = [merges[0], f"{ESC}t he", "ö ö", *merges[1:], f"{ESC}q{ESC} x"]
    return tokens, merges


def write_raw_vocab(path: Path, tokens: list[str], merges: list[str], pre: str, model: str = "gpt2",
                    add_bos: bool | None = False, add_eos: bool = False,
                    lowercase: bool | None = None) -> Path:  # fmt: skip
    """A vocab-only GGUF as llama.cpp's converter writes Gemma 4's (`add_bos` None: not stated)."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny raw")
    w.add_uint32("llama.context_length", 64)
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3 if t in SPECIALS else 6 if t.startswith("<0x") else 1 for t in tokens])
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(1)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.add_add_eos_token(add_eos)
    if lowercase is not None:
        w.add_bool("tokenizer.ggml.normalizer.lowercase", lowercase)
    finish(w)
    return path


@pytest.mark.oracle
def test_model_whitespace_over_byte_level_bpe(bpe: tuple[list[str], list[str]], tmp_path: Path) -> None:
    """tokenizer.ggml.model "whitespace" with a byte-level pre-tokenizer (lowercased: llama.cpp's default)."""
    import llama_cpp as llama_cpp

    path = write_bpe_vocab(tmp_path / "ws-gpt2.gguf", *bpe, "gpt-2")
    spec = replace(open_gguf(path).tokenizer_spec() or TokenizerSpec("x"), model="whitespace")
    tok = build_tokenizer(spec)
    w = gguf.GGUFWriter(tmp_path / "ws.gguf", "llama")
    for key, f in gguf.GGUFReader(path).fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = "whitespace" if key == "tokenizer.ggml.model" else f.contents()
        sub = f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, value, f.types[0], sub_type=sub)
    finish(w)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "ws.gguf"), vocab_only=True, verbose=False)
    assert_ids(tok, llama_ids(llm, TEXTS))
    assert tok.encode("ABC def") == tok.encode("abc\u3000 DEF")


def _aborts(pre: str, text: str) -> bool:
    """llama.cpp aborts (GGML_ASSERT in find_bpe_rank) on a word that has a space and two symbols: the
    whitespace pre-tokenizer keeps runs of whitespace as words."""
    if pre != "whitespace":
        return False
    import re

    return any(" " in w and len(w) > 1 for w in re.findall(r"\s+", text.replace("\x1c", "")))


CASES = {  # name: (tokenizer.ggml.pre, tokenizer.ggml.model, add_bos as written, add_eos, lowercase)
    "gemma4": ("gemma4", "gpt2", False, False, None),  # BOS all the same (llama.cpp's Gemma 4 workaround)
    "granite-embed-multi-311m": ("granite-embed-multi-311m", "gpt2", None, True, None),
    "sarvam-moe": ("sarvam-moe", "gpt2", True, False, None),
    "sarvam-moe-no-bos": ("sarvam-moe", "gpt2", None, False, None),
    "whitespace": ("whitespace", "gpt2", True, False, None),
    "model-gemma4": ("default", "gemma4", False, False, None),  # that model forces pre "gemma4"
    # tokenizer.ggml.model "whitespace": whitespace dropped, then the pre-tokenizer's BPE on each run
    "model-whitespace": ("whitespace", "whitespace", True, False, None),  # not lowercased
    "model-whitespace-lower": ("whitespace", "whitespace", True, False, True),
    "model-whitespace-gemma4": ("gemma4", "whitespace", None, False, None),  # escaped first, lowercased
}


@pytest.mark.oracle
@pytest.mark.parametrize("case", list(CASES))
def test_equals_llama_cpp(case: str, raw_bpe: tuple[list[str], list[str]], tmp_path: Path) -> None:
    """Exact ids (tolerance: none), BOS / EOS included, and decode byte for byte."""
    pre, model, add_bos, add_eos, lowercase = CASES[case]
    path = write_raw_vocab(tmp_path / f"{case}.gguf", *raw_bpe, pre, model, add_bos, add_eos, lowercase)
    texts = [t for t in [*TEXTS, *MORE] if model == "whitespace" or not _aborts(pre, t)]
    assert len(texts) > 150
    c = compare_with_llama(path, texts)
    assert (c.want[""][:1] == [BOS]) == (case != "sarvam-moe-no-bos")
    # decode: llama_token_to_piece of each id, concatenated (bytes not UTF-8, dropped ones cut, as U+FFFD)
    assert_pieces(c.tok, c.llm, list(c.want.values()))
    # the .apr keys carry everything this tokenizer needs: rebuilt from them, still llama.cpp's ids
    assert_apr_round_trip(c.spec, c.want)


def test_whitespace_run_with_a_space_is_an_error(
    raw_bpe: tuple[list[str], list[str]], tmp_path: Path
) -> None:
    """llama.cpp aborts the process there (not run: it would take pytest down); apr says why."""
    path = write_raw_vocab(tmp_path / "ws.gguf", *raw_bpe, "whitespace", add_bos=True)
    spec = open_gguf(path).tokenizer_spec()
    assert spec is not None
    tok = build_tokenizer(spec)
    assert tok.encode("a b") == [BOS, *tok.encode_text("a"), *tok.encode_text(" "), *tok.encode_text("b")]
    with pytest.raises(FormatError, match=r"^llama\.cpp cannot tokenize this text: its BPE merge lookup"):
        tok.encode("a  b")
