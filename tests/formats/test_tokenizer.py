"""Tokenizer from GGUF metadata: ids equal llama.cpp's own tokenizer on SmolLM2 (and on its vocab
under other `tokenizer.ggml.pre` values), decode round-trips, clear errors for what is unsupported.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apr.errors import AprIOError, FormatError
from apr.formats.base import TokenizerSpec
from apr.formats.gguf import open_gguf
from apr.formats.tokenizer import BYTE_CHARS, PRE_TOKENIZERS, Tokenizer, build_tokenizer

KNOWN = {  # oracles.md §2: identical in llama.cpp, HF tokenizers and transformers
    "What is 2+2?": [1780, 314, 216, 34, 27, 34, 47],
    "The capital of France is": [504, 3575, 282, 4649, 314],
    " hello  world\n\n123456 don't": [33662, 216, 905, 1116, 33, 34, 35, 36, 37, 38, 1326, 982],
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n": [
        1,
        4093,
        198,
        1780,
        314,
        216,
        34,
        27,
        34,
        47,
        2,
        198,
    ],
    "naïve café 日本語 🤖": [
        3546,
        46494,
        37366,
        17097,
        241,
        115,
        40993,
        179,
        120,
        248,
        15107,
        114,
        240,
    ],
}
HARD = [
    "",
    " ",
    "中文分词测试：你好，世界！",
    "こんにちは、世界。カタカナ",
    "한국어 텍스트",
    "emoji 👩‍👩‍👧‍👦 🏳️‍🌈 🇫🇷 👍🏽",
    "e\u0301 a\u0308 n\u0303 — combining marks",
    "\u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627 RTL \u200f mixed",
    "12345678901234567890 3.14159 1,000,000 ١٢٣ ٣٤",
    "tabs\tand\t\ttabs\n\n\nnewlines   \n  trailing spaces   ",
    "\r\n\r\nwindows\r\nlines",
    "I'm you're we've they'll he'd it's DON'T I'M",
    "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>glued<|endoftext|>x",
    "<|im_start|<|im_end|>>",
    "   leading and trailing   ",
    "a\u00a0b\u2009c\u3000d",  # no-break, thin and ideographic spaces
    "zero\u200bwidth\ufeffbom",
    "def f(x):\n    return x ** 2  # comment\n",
    "https://example.com/path?q=1&r=two#frag",
    "\x00\x01\x7f control chars",
    "!\x1d! \x04hello x\U00040000a",  # bytes SmolLM2 has no token for: dropped, merges stop there
]


@pytest.fixture(scope="module")
def spec(smollm2_gguf: Path) -> TokenizerSpec:
    s = open_gguf(smollm2_gguf).tokenizer_spec()
    assert s is not None
    return s


@pytest.fixture(scope="module")
def tok(spec: TokenizerSpec) -> Tokenizer:
    return build_tokenizer(spec)


@pytest.fixture(scope="module")
def llama(smollm2_gguf: Path) -> Any:
    import llama_cpp as llama_cpp

    return llama_cpp.Llama(model_path=str(smollm2_gguf), vocab_only=True, verbose=False)


def llama_ids(llm: Any, text: str) -> list[int]:
    return list(llm.tokenize(text.encode(), add_bos=False, special=True))


def assert_round_trip(tok: Tokenizer, text: str) -> None:
    """decode(encode(text)) == text, unless text needs a byte the vocab lacks (SmolLM2 has no token
    for 0x04, 0xF1, ...: llama.cpp and `tokenizers` both drop such bytes)."""
    if all(tok.backend.token_to_id(BYTE_CHARS[b]) is not None for b in text.encode()):
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", KNOWN)
def test_known_vectors(tok: Tokenizer, text: str) -> None:
    assert tok.encode(text) == KNOWN[text]
    assert tok.decode(KNOWN[text]) == text


@pytest.mark.oracle
@pytest.mark.parametrize("text", list(KNOWN) + HARD)
def test_equals_llama_cpp(tok: Tokenizer, llama: Any, text: str) -> None:
    assert tok.encode(text) == llama_ids(llama, text)
    assert_round_trip(tok, text)


_PIECES = st.sampled_from(
    ["'s", "'t", "'ll", "'", " ", "  ", "\n", "\n\n", "\t", "\r", "\u00a0", "<|im_start|>",
     "<|im_end|>", "0", "42", "١", "a", "The", " é", "e\u0301", "日本", "🤖", "!", "?!", "...", "-",
     "_", "\u200b", "\x04", "\x1d"]
)  # fmt: skip
# Code points unassigned in Python's Unicode tables (Cn) are left out: llama.cpp and `tokenizers`
# (onig) classify characters with Unicode tables of different versions and disagree on newer ones.
_CHARS = st.characters(exclude_categories=["Cs", "Cn"])
TEXT = st.one_of(st.text(_CHARS, max_size=40), st.lists(_PIECES, max_size=12).map("".join))


@pytest.mark.oracle
@settings(max_examples=400, deadline=None)
@given(TEXT)
def test_random_text_equals_llama_cpp(tok: Tokenizer, llama: Any, text: str) -> None:
    assert tok.encode(text) == llama_ids(llama, text)
    assert_round_trip(tok, text)


def test_build_is_fast(spec: TokenizerSpec) -> None:
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        build_tokenizer(spec)
        best = min(best, time.perf_counter() - t)
    assert best <= 0.5


def test_vocab_size_and_bos(spec: TokenizerSpec) -> None:
    tok = build_tokenizer(replace(spec, add_bos=True))
    assert tok.vocab_size == 49152
    assert tok.encode("What is 2+2?") == [1, 1780, 314, 216, 34, 27, 34, 47]


# ---- the same vocab under other pre-tokenizers, against llama.cpp -------------------------------


@pytest.fixture(scope="module")
def vocab_files(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Vocab-only copies of SmolLM2 (every KV pair, no tensors) with another tokenizer.ggml.pre."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(smollm2_gguf)
    out = {}
    for pre in ("qwen2", "llama-bpe", "gpt-2", "default"):
        path = tmp_path_factory.mktemp("vocab") / f"{pre}.gguf"
        w = GGUFWriter(path, "llama")
        for key, f in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue
            value = pre if key == "tokenizer.ggml.pre" else f.contents()
            sub = f.types[1] if f.types[0] == GGUFValueType.ARRAY else None
            w.add_key_value(key, value, f.types[0], sub_type=sub)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        out[pre] = path
    return out


@pytest.fixture(scope="module", params=["qwen2", "llama-bpe", "gpt-2", "default"])
def other_pre(
    request: pytest.FixtureRequest, vocab_files: dict[str, Path]
) -> Iterator[tuple[Tokenizer, Any]]:
    import llama_cpp as llama_cpp

    path = vocab_files[request.param]
    spec = open_gguf(path).tokenizer_spec()
    assert spec is not None and spec.pre == request.param
    yield (
        build_tokenizer(spec),
        llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False),
    )


@pytest.mark.oracle
def test_other_pre_tokenizers_equal_llama_cpp(other_pre: tuple[Tokenizer, Any]) -> None:
    tok, llm = other_pre
    for text in list(KNOWN) + HARD:
        assert tok.encode(text) == llama_ids(llm, text), text


@pytest.mark.oracle
@settings(max_examples=150, deadline=None)
@given(text=TEXT)
def test_other_pre_tokenizers_random_text(other_pre: tuple[Tokenizer, Any], text: str) -> None:
    tok, llm = other_pre
    assert tok.encode(text) == llama_ids(llm, text)


# ---- tokenizer.json and errors ------------------------------------------------------------------


def test_tokenizer_json(tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    tok.backend.save(str(path))
    from_json = build_tokenizer(TokenizerSpec(model="tokenizer.json", json_path=path))
    assert from_json.vocab_size == 49152
    for text in list(KNOWN) + HARD:
        assert from_json.encode(text) == tok.encode(text)


def test_tokenizer_json_errors(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="^a 'tokenizer.json' tokenizer spec needs json_path$"):
        build_tokenizer(TokenizerSpec(model="tokenizer.json"))
    missing = tmp_path / "nope.json"
    with pytest.raises(AprIOError) as e:
        build_tokenizer(TokenizerSpec(model="tokenizer.json", json_path=missing))
    assert str(e.value) == f"tokenizer file not found: {missing}"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(FormatError, match=f"^{bad}: cannot build the tokenizer: "):
        build_tokenizer(TokenizerSpec(model="tokenizer.json", json_path=bad))


TINY = TokenizerSpec(
    model="gpt2", pre="smollm", tokens=("a", "b", "ab"), merges=("a b",), token_types=(1, 1, 1)
)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (replace(TINY, pre="no-such-pre"),
         f"tokenizer.ggml.pre 'no-such-pre' is not supported (supported: {', '.join(PRE_TOKENIZERS)})"),
        (replace(TINY, model="none"),
         "vocab-less tokenizers (tokenizer.ggml.model 'none') are not supported"),
        (replace(TINY, model="plamo2"), "the PLaMo-2 vocab has no byte token <0x00> (llama.cpp refuses it)"),
        (replace(TINY, model="bert"),
         "a WPM vocab needs its [CLS] (BOS) and [SEP] tokens: ids None and None"),
        (replace(TINY, model="bpe"),
         "tokenizer model 'bpe' is not supported "
         "(supported: llama, gpt2, gemma4, whitespace, hybriddna, rwkv, plamo2, test, bert, t5, "
         "tokenizer.json)"),
        (replace(TINY, token_types=(1, 1)), "tokenizer.ggml.token_type has 2 entries for 3 tokens"),
        (replace(TINY, add_bos=True), "add_bos is set but the BOS id None is not a token id"),
        (replace(TINY, add_bos=True, bos_id=3),
         "add_bos is set but the BOS id 3 is not a token id"),
    ],
)  # fmt: skip
def test_spec_errors(bad: TokenizerSpec, message: str) -> None:
    with pytest.raises(FormatError) as e:
        build_tokenizer(bad)
    assert str(e.value) == message


@pytest.fixture(scope="module")
def odd_merges(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, Any]:
    """SmolLM2's vocab with merges llama.cpp accepts and `tokenizers` refuses, ranked first: results that
    are not tokens (ASCII, and with Ġ), an operand that is not a token, a repeat of a later merge."""
    import llama_cpp as llama_cpp
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(smollm2_gguf)
    vocab = set(reader.fields["tokenizer.ggml.tokens"].contents())
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    odd = [f"{a} {b}" for a in "Ġqzxjkv" for b in "qzxjkvw" if a + b not in vocab][:12]
    first = odd[0].replace(" ", "")
    odd += [f"{first} e", f"e {first}", merges[500], "Ġ Ġ"]
    path = tmp_path_factory.mktemp("odd") / "odd.gguf"
    w = GGUFWriter(path, "llama")
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = odd + merges if key == "tokenizer.ggml.merges" else f.contents()
        sub = f.types[1] if f.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(key, value, f.types[0], sub_type=sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    spec = open_gguf(path).tokenizer_spec()
    assert spec is not None
    return build_tokenizer(spec), llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


@pytest.mark.oracle
@settings(max_examples=150, deadline=None)
@given(text=st.one_of(TEXT, st.lists(st.sampled_from([*" qzxjkvwe", "  ", "Ġ"]), max_size=20).map("".join)))
def test_merges_of_non_tokens_run_as_in_llama_cpp(odd_merges: tuple[Tokenizer, Any], text: str) -> None:
    """llama.cpp merges even where the result is not a token, and emits such a symbol as the tokens of
    its ASCII bytes; `tokenizers` would refuse the vocab."""
    tok, llm = odd_merges
    assert tok.encode(text) == llama_ids(llm, text)


def test_tiny_vocab() -> None:
    tok = build_tokenizer(TINY)
    assert tok.encode("ab") == [2] and tok.encode("ba") == [1, 0] and tok.decode([2, 0]) == "aba"


HOSTILE_BPE = {  # `tokenizers` panics building it: BpeBuilder slices each merge past a 20-byte prefix
    "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
    "pre_tokenizer": None, "post_processor": None, "decoder": None,
    "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "x" * 20,
              "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
              "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]},
}  # fmt: skip


def test_a_panic_prints_nothing_but_the_error(tmp_path: Path) -> None:
    """Rust's panic hook writes to fd 2 itself; the boundary holds that back (a subprocess, to see fd 2),
    and passes on what else reaches fd 2 meanwhile."""
    import json
    import subprocess
    import sys

    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(HOSTILE_BPE))
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from apr.formats.base import TokenizerSpec\n"
        "from apr.formats.tokenizer import build_tokenizer\n"
        "from apr.formats.tokenizer_bpe import load\n"
        "load(lambda: os.write(2, b'passed on\\n'))\n"
        "try:\n"
        "    build_tokenizer(TokenizerSpec(model='tokenizer.json', json_path=Path(sys.argv[1])))\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e, '|', e.__cause__.__notes__[0].splitlines()[0])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stderr == "passed on\n", done.stderr
    message, note = done.stdout.strip().split(" | ")
    assert message == (
        f"FormatError {path}: cannot build the tokenizer: the tokenizers library panicked: "
        "range end index 18446744073709551598 out of range for slice of length 2"
    )
    assert note.startswith("thread '<unnamed>'") and "panicked at" in note
